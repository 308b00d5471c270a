"""A request shaped like what Claude Code 2.1.x sends to `POST /v1/messages?beta=true`.

As seen on the wire (docs/dialects.md): system as three text blocks with `cache_control`, a
system-role message inside `messages` (also last), `thinking: adaptive`, `context_management`,
`output_config`, `metadata.user_id`, `max_tokens: 32000`, a dozen tools with `input_schema`, and
tool results with `cache_control` and `is_error`.
"""

from __future__ import annotations

from typing import Any

CLAUDE_CODE_HEADERS = {
    "anthropic-version": "2023-06-01",
    "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,context-management-2025-06-27",
    "x-app": "cli",
    "user-agent": "claude-cli/2.1.3 (external, cli)",
}

SYSTEM_BLOCKS = [
    {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.3; cc_entrypoint=cli"},
    {
        "type": "text",
        "text": "You are Claude Code, Anthropic's official CLI for Claude.",
        "cache_control": {"type": "ephemeral"},
    },
    {
        "type": "text",
        "text": "You are an interactive CLI tool that helps users with software engineering tasks.\n\n# Tone\n...",
        "cache_control": {"type": "ephemeral"},
    },
]

TOOL_NAMES = [
    "Task",
    "Bash",
    "Glob",
    "Grep",
    "ExitPlanMode",
    "Read",
    "Edit",
    "Write",
    "NotebookEdit",
    "WebFetch",
    "TodoWrite",
    "WebSearch",
    "BashOutput",
    "KillShell",
]


def _tool(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "description": f"The {name} tool.",
        "input_schema": {
            "$schema": "http://json-schema.org/draft-07/schema#",
            "type": "object",
            "properties": {"command": {"type": "string", "description": "what to run"}},
            "required": ["command"],
            "additionalProperties": False,
        },
    }


def claude_code_request(model: str, *, stream: bool = True) -> dict[str, Any]:
    return {
        "model": model,
        "max_tokens": 32000,
        "stream": stream,
        "system": SYSTEM_BLOCKS,
        "thinking": {"type": "adaptive"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "high"},
        "metadata": {"user_id": "user_4f1c0ffee_account__session_7d2a"},
        "tools": [_tool(name) for name in TOOL_NAMES],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "<system-reminder>\nAs you answer, use the context.\n</system-reminder>"},
                    {"type": "text", "text": "list the files here", "cache_control": {"type": "ephemeral"}},
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "I should run ls.", "signature": "c2lnbmF0dXJl"},
                    {"type": "text", "text": "Listing."},
                    {"type": "tool_use", "id": "toolu_01A", "name": "Bash", "input": {"command": "ls"}},
                    {"type": "tool_use", "id": "toolu_01B", "name": "Bash", "input": {"command": "ls -a /nope"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_01A", "content": "README.md\nsrc"},
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_01B",
                        "content": [{"type": "text", "text": "<tool_use_error>No such file</tool_use_error>"}],
                        "is_error": True,
                        "cache_control": {"type": "ephemeral"},
                    },
                ],
            },
            {"role": "system", "content": "The user switched to plan mode."},
            {"role": "user", "content": "now summarise"},
            {"role": "system", "content": [{"type": "text", "text": "Reminder: be brief."}]},
        ],
    }
