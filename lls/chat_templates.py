"""Per-model chat templates (`models.<name>.chat_template`): the forms, their checks, and
where an agent keeps a template's text.

The value's form, in this order:
  - ""                         the GGUF's own template (llama-server's default);
  - text with `{{` or `{%`     inline Jinja;
  - a name in BUILTIN          llama-server's built-in template of that name;
  - anything else              a Jinja file, relative to the config file's folder.
After config load a file's text has replaced its path, so the value is "", a built-in name
or Jinja text (`kind`). The text travels to the host in the StartInstance command; the agent
writes it under its own store (`write_template`) and passes `--chat-template-file`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from proto.messages import GgufSummary

# llama-server's built-in templates, from the pinned llama.cpp (src/llama-chat.cpp,
# LLM_CHAT_TEMPLATES). tests/test_chat_templates.py checks them against the binary's --help.
BUILTIN = (
    "bailing",
    "bailing-think",
    "bailing2",
    "chatglm3",
    "chatglm4",
    "chatml",
    "command-r",
    "deepseek",
    "deepseek-ocr",
    "deepseek2",
    "deepseek3",
    "exaone-moe",
    "exaone3",
    "exaone4",
    "falcon3",
    "gemma",
    "gigachat",
    "glmedge",
    "gpt-oss",
    "granite",
    "granite-4.0",
    "granite-4.1",
    "grok-2",
    "hunyuan-dense",
    "hunyuan-moe",
    "hunyuan-vl",
    "kimi-k2",
    "llama2",
    "llama2-sys",
    "llama2-sys-bos",
    "llama2-sys-strip",
    "llama3",
    "llama4",
    "megrez",
    "minicpm",
    "mistral-v1",
    "mistral-v3",
    "mistral-v3-tekken",
    "mistral-v7",
    "mistral-v7-tekken",
    "monarch",
    "openchat",
    "orion",
    "pangu-embedded",
    "phi3",
    "phi4",
    "rwkv-world",
    "seed_oss",
    "smolvlm",
    "solar-open",
    "vicuna",
    "vicuna-orca",
    "yandex",
    "zephyr",
)

# A template travels inside a bus command (1 MiB messages): real ones are a few to ~20 KB.
MAX_TEMPLATE_BYTES = 128 * 1024
# The agent's folder for template files, inside its store: hidden, so the store scan skips it,
# and mounted with the store (read-only) into Docker instances.
TEMPLATE_DIR = ".chat-templates"

# llama-server flags that choose the template, or the engine a form needs
TEMPLATE_FLAGS = frozenset({"--chat-template", "--chat-template-file"})
JINJA_ON, JINJA_OFF = "--jinja", "--no-jinja"

Kind = Literal["", "builtin", "jinja"]


def is_jinja(value: str) -> bool:
    return "{{" in value or "{%" in value


def kind(value: str) -> Kind:
    """The form of a loaded config's value (a file's text has replaced its path by then)."""
    if not value:
        return ""
    return "jinja" if is_jinja(value) else "builtin"


def flags_in(args: Iterable[str], flags: Iterable[str]) -> list[str]:
    """The `flags` present in `args` (as `--flag` or `--flag=value`), in order."""
    wanted = set(flags)
    return [a.split("=", 1)[0] for a in args if a.split("=", 1)[0] in wanted]


def check(value: str, args: Iterable[str]) -> str | None:
    """Why `value` (resolved) cannot go with the model's `args`, or None."""
    args = list(args)
    if value and (clash := flags_in(args, TEMPLATE_FLAGS)):
        return f"args sets {clash[0]} too; use one of the two"
    k = kind(value)
    if k == "builtin" and value not in BUILTIN:
        return f"{value!r} is not a built-in template (one of: {', '.join(BUILTIN)})"
    if k == "builtin" and flags_in(args, [JINJA_ON]):
        # llama-server would read the name as Jinja source: the prompt would be the name
        return "a built-in template runs with --no-jinja; args sets --jinja"
    if k == "jinja" and flags_in(args, [JINJA_OFF]):
        return "a Jinja template needs Jinja; args sets --no-jinja"
    return None


def resolve(value: str, base: Path) -> str:
    """A configured value as "", a built-in name or Jinja text: a file's text replaces its
    path (relative to `base`, the config file's folder). ValueError says why not."""
    if not value or is_jinja(value) or value in BUILTIN:
        return value
    path = Path(os.path.expanduser(os.path.expandvars(value)))
    path = path if path.is_absolute() else base / path
    try:
        with path.open("rb") as f:
            data = f.read(MAX_TEMPLATE_BYTES + 1)
    except FileNotFoundError:
        if "/" not in value and os.sep not in value:  # a mistyped name, most likely
            raise ValueError(
                f"{value!r} is neither a built-in template (one of: {', '.join(BUILTIN)}) "
                f"nor a file (no {path})"
            ) from None
        raise ValueError(f"no such file: {path}") from None
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) > MAX_TEMPLATE_BYTES:
        raise ValueError(f"{path} is over {MAX_TEMPLATE_BYTES // 1024} KiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    if not is_jinja(text):
        raise ValueError(f"{path} has no Jinja in it ({{{{ or {{%): not a chat template")
    return text


def argv(builtin: str = "", file: str = "") -> list[str]:
    """llama-server flags for a built-in template's name, or for a Jinja file (its path as
    the server sees it). A built-in name needs --no-jinja: with Jinja on (the default)
    llama-server renders the name itself as the template, and the prompt is the name."""
    if file:
        return [JINJA_ON, "--chat-template-file", file]
    if builtin:
        return [JINJA_OFF, "--chat-template", builtin]
    return []


def template_filename(text: str) -> str:
    """The store-relative name of a template's file: named by its content, never by anyone
    on the bus."""
    return f"{TEMPLATE_DIR}/{hashlib.sha256(text.encode()).hexdigest()[:32]}.jinja"


def write_template(store: Path, text: str) -> str:
    """Write `text` into the store's template folder (once per content; atomically) and
    return its store-relative name."""
    rel = template_filename(text)
    path = store / rel
    data = text.encode()
    try:
        if path.read_bytes() == data:
            return rel
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o755)  # a container's user (root without capabilities) reads it
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o644)
    tmp.replace(path)
    return rel


def missing(configured: str, has_template: bool | None) -> bool:
    """Whether a model runs with llama-server's ChatML fallback: its GGUF (header known)
    has no template and none is configured."""
    return not configured and has_template is False


def warning(model: str) -> str:
    return (
        f"{model}: its GGUF has no chat template, so llama-server falls back to ChatML; "
        f"set models.{model}.chat_template"
    )


def warnings(
    configured: Mapping[str, str], headers: Iterable[tuple[str, GgufSummary | None]]
) -> dict[str, str]:
    """model -> warning for each configured model (`configured`: model -> its chat_template)
    that a header (`headers`: (model, summary) from host stores or its source) shows has
    no template while none is configured."""
    out = {}
    for model, summary in headers:
        has = summary.has_chat_template if summary is not None else None
        if model in configured and missing(configured[model], has):
            out[model] = warning(model)
    return out
