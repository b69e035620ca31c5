"""The HTTP client side of the CLI: `list`, `ps`, `run`, plus the helpers `preload` and `launchd status` share.

Output mimics the ollama CLI (tab-aligned columns, "4.7 GB", "2 days ago") so muscle memory carries over.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from typing import Any, Callable, Mapping, Optional, Sequence, TextIO
from urllib.parse import urlsplit

import httpx

from mlx_server.config.load import DEFAULT_PORT, Config
from mlx_server.models.info import InfoCache
from mlx_server.models.registry import Registry
from mlx_server.models.sources import locate

ReadLine = Callable[[str], Optional[str]]


class ClientError(Exception):
    """A failure to show the user as `Error: <message>` (exit status 1)."""


def server_url(explicit: Optional[str], config: Optional[Config], env: Optional[Mapping[str, str]] = None) -> str:
    """--server, then $MLX_SERVER_URL, then the config's host/port. Accepts OLLAMA_HOST-style `host[:port]`."""
    env = os.environ if env is None else env
    raw = explicit or env.get("MLX_SERVER_URL")
    if not raw:
        host, port = ("127.0.0.1", DEFAULT_PORT) if config is None else (config.server.host, config.server.port)
        raw = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if "://" not in raw:
        if raw.count(":") > 1 and not raw.startswith("["):  # a bare IPv6 address
            raw = f"[{raw}]"
        raw = f"http://{raw}"
    parts = urlsplit(raw)
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ClientError(f"invalid server URL {raw!r}") from None
    host = parts.hostname or "127.0.0.1"
    if host in ("0.0.0.0", "::"):  # a wildcard bind is reached through loopback
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}:{port}{parts.path.rstrip('/')}"


def api_key(config: Optional[Config], env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    env = os.environ if env is None else env
    return env.get("MLX_SERVER_API_KEY") or (config.server.api_key if config else None)


def http_client(url: str, key: Optional[str] = None, timeout: Optional[float] = 10.0) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    # Reads may legitimately take minutes (a model loading, a long generation); connecting may not.
    return httpx.Client(base_url=url, headers=headers, timeout=httpx.Timeout(timeout, connect=5.0))


def error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip() or f"HTTP {response.status_code}"
    if isinstance(body, dict) and body.get("error"):
        err = body["error"]
        return err.get("message", str(err)) if isinstance(err, dict) else str(err)
    return f"HTTP {response.status_code}"


def get_json(client: httpx.Client, path: str) -> Any:
    try:
        response = client.get(path)
    except httpx.TransportError as exc:
        raise ClientError(f"could not connect to mlx-server at {client.base_url} ({exc}); is it running?") from exc
    if response.status_code >= 400:
        raise ClientError(error_text(response))
    return response.json()


# ---- formatting -----------------------------------------------------------------------------------------------


def human_size(n: float) -> str:
    """Decimal units like ollama: 4.7 GB, 397 MB, 12 KB."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            if unit == "B":
                return f"{int(n)} B"
            return f"{n:.1f} {unit}" if abs(n) < 10 else f"{n:.0f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _plural(n: int, unit: str) -> str:
    return f"{n} {unit}{'' if n == 1 else 's'}"


def relative_time(when: dt.datetime, now: Optional[dt.datetime] = None) -> str:
    """'2 days ago' / '4 minutes from now', the way ollama list and ollama ps phrase times."""
    now = now or dt.datetime.now(dt.timezone.utc)
    delta = (now - when).total_seconds()
    future = delta < 0
    s = abs(delta)
    if s < 1:
        return "Less than a second from now" if future else "Less than a second ago"
    if s < 60:
        text = _plural(int(s), "second")
    elif s < 120:
        text = "About a minute"
    elif s < 3600:
        text = _plural(int(s // 60), "minute")
    elif s < 7200:
        text = "About an hour"
    elif s < 86400:
        text = _plural(int(s // 3600), "hour")
    elif s < 86400 * 14:
        text = _plural(int(s // 86400), "day")
    elif s < 86400 * 60:
        text = _plural(int(s // (86400 * 7)), "week")
    elif s < 86400 * 730:
        text = _plural(int(s // (86400 * 30)), "month")
    else:
        text = _plural(int(s // (86400 * 365)), "year")
    return f"{text} from now" if future else f"{text} ago"


def parse_time(text: str) -> dt.datetime:
    # fromisoformat only learned the trailing Z (and 9-digit fractions) in Python 3.11.
    text = text.strip().replace("Z", "+00:00")
    if "." in text:
        head, _, rest = text.partition(".")
        digits = "".join(c for c in rest if c.isdigit())
        tz = rest[len(digits) :]
        text = f"{head}.{digits[:6]}{tz}"
    when = dt.datetime.fromisoformat(text)
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    lines = ["   ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in [headers, *rows]]
    return "\n".join(lines)


# ---- list / ps ------------------------------------------------------------------------------------------------


def _list_rows_from_disk(config: Config) -> list[list[str]]:
    """What /api/tags would list: each model on disk (created ones included), then each alias of one (as the
    server lists them)."""
    config.attach_created(Registry(config.server.cache_dir).models)
    infos = InfoCache()
    cfg_dir = config.path.parent if config.path else None
    rows: dict[str, list[str]] = {}
    for name, model in config.models.items():
        found = locate(model, cfg_dir, config.server.cache_dir)
        if not found.present:
            continue
        info = infos.describe(found)
        modified = relative_time(info.modified) if info else "unknown"
        rows[name] = [name, found.digest[:12], human_size(found.size), modified]
    aliases = [[alias, *rows[name][1:]] for alias, name in config.aliases().items() if name in rows]
    return [*rows.values(), *aliases]


def cmd_list(url: str, config: Optional[Config], out: TextIO, err: TextIO, key: Optional[str] = None) -> int:
    with http_client(url, key) as client:
        try:
            models = get_json(client, "/api/tags")["models"]
            rows = [
                [
                    m["name"],
                    str(m.get("digest", ""))[:12],
                    human_size(m.get("size", 0)),
                    relative_time(parse_time(m["modified_at"])) if m.get("modified_at") else "",
                ]
                for m in models
            ]
        except ClientError as exc:
            if config is None:
                raise
            print(f"note: no answer from {url} ({exc}); listing {config.path} against the disk", file=err)
            rows = _list_rows_from_disk(config)
    print(format_table(["NAME", "ID", "SIZE", "MODIFIED"], rows), file=out)
    return 0


def cmd_ps(url: str, out: TextIO, key: Optional[str] = None) -> int:
    with http_client(url, key) as client:
        models = get_json(client, "/api/ps")["models"]
    rows = []
    for m in models:
        expires = parse_time(m["expires_at"]) if m.get("expires_at") else None
        if expires is None or expires.year >= 2300:  # the far-future stamp Ollama uses for keep_alive < 0
            until = "Forever"
        elif expires <= dt.datetime.now(dt.timezone.utc):
            until = "Stopping..."
        else:
            until = relative_time(expires)
        size, vram = int(m.get("size", 0)), int(m.get("size_vram", m.get("size", 0)))
        # MLX keeps weights in unified memory used by the GPU, so this is "100% GPU" whenever size_vram == size.
        gpu = round(100 * vram / size) if size else 100
        processor = "100% GPU" if gpu >= 100 else f"{100 - gpu}%/{gpu}% CPU/GPU"
        rows.append([m["name"], str(m.get("digest", ""))[:12], human_size(size), processor, until])
    print(format_table(["NAME", "ID", "SIZE", "PROCESSOR", "UNTIL"], rows), file=out)
    return 0


# ---- run ------------------------------------------------------------------------------------------------------


def stream_chat(client: httpx.Client, model: str, messages: list[dict[str, Any]], out: TextIO) -> str:
    """POST /api/chat and print tokens as they arrive; returns the assistant's content."""
    content: list[str] = []
    thinking = False
    body = {"model": model, "messages": messages, "stream": True}
    try:
        with client.stream("POST", "/api/chat", json=body, timeout=httpx.Timeout(None, connect=5.0)) as response:
            if response.status_code >= 400:
                response.read()
                raise ClientError(error_text(response))
            for raw in response.iter_lines():
                if not raw.strip():
                    continue
                obj = json.loads(raw)
                if obj.get("error"):
                    raise ClientError(str(obj["error"]))
                message = obj.get("message") or {}
                if message.get("thinking"):
                    if not thinking:
                        out.write("Thinking...\n")
                        thinking = True
                    out.write(message["thinking"])
                if message.get("content"):
                    if thinking:
                        out.write("\n...done thinking.\n\n")
                        thinking = False
                    content.append(message["content"])
                    out.write(message["content"])
                out.flush()
                if obj.get("done"):
                    break
    except httpx.TransportError as exc:
        raise ClientError(f"could not connect to mlx-server at {client.base_url} ({exc}); is it running?") from exc
    return "".join(content)


def _read_line(prompt: str) -> Optional[str]:
    try:
        import readline  # noqa: F401 - importing it gives input() line editing and history
    except ImportError:
        pass
    try:
        return input(prompt)
    except EOFError:
        return None


def chat_loop(
    client: httpx.Client,
    model: str,
    out: TextIO,
    err: TextIO,
    read_line: ReadLine = _read_line,
    history: Optional[list[dict[str, Any]]] = None,
) -> int:
    """Interactive chat keeping the conversation; /bye (or EOF) exits, /clear forgets, Ctrl-C stops a reply."""
    history = [] if history is None else history
    print("Send a message (/? for help)", file=err)
    while True:
        try:
            text = read_line(">>> ")
        except KeyboardInterrupt:
            print("\nUse Ctrl + d or /bye to exit.", file=err)
            continue
        if text is None:
            out.write("\n")
            return 0
        text = text.strip()
        if not text:
            continue
        if text in ("/bye", "/exit"):
            return 0
        if text == "/clear":
            history.clear()
            print("Cleared session context", file=err)
            continue
        if text.startswith("/"):
            print("Available commands:\n  /clear   forget the conversation\n  /bye     exit", file=err)
            continue
        history.append({"role": "user", "content": text})
        try:
            reply = stream_chat(client, model, history, out)
        except KeyboardInterrupt:
            history.pop()
            out.write("\n")
            continue
        except ClientError as exc:
            history.pop()
            print(f"Error: {exc}", file=err)
            continue
        history.append({"role": "assistant", "content": reply})
        out.write("\n\n")
        out.flush()


def cmd_run(
    url: str,
    model: str,
    prompt: Optional[str],
    *,
    key: Optional[str] = None,
    stdin: Optional[TextIO] = None,
    out: Optional[TextIO] = None,
    err: Optional[TextIO] = None,
    read_line: ReadLine = _read_line,
) -> int:
    # Resolved per call, not at import: tests and callers may swap the standard streams.
    stdin, out, err = stdin or sys.stdin, out or sys.stdout, err or sys.stderr
    with http_client(url, key) as client:
        if prompt is None and stdin.isatty():
            return chat_loop(client, model, out, err, read_line)
        if prompt is None:
            prompt = stdin.read()
        if not prompt.strip():
            raise ClientError("empty prompt")
        stream_chat(client, model, [{"role": "user", "content": prompt}], out)
        out.write("\n")
        out.flush()
    return 0


__all__ = [
    "ClientError",
    "cmd_list",
    "cmd_ps",
    "cmd_run",
    "chat_loop",
    "format_table",
    "get_json",
    "http_client",
    "human_size",
    "relative_time",
    "server_url",
]
