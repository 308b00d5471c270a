"""HTTP hygiene shared by both daemons: JSON errors for what aiohttp rejects itself, body encodings, banners.

docs/reliability.md describes the failure model these parts enforce.
"""
