"""The command line: argument parsing, and list / ps / run against a real server (and without one)."""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path
from typing import Iterator, Optional

import pytest

from mlx_server.cli import build_parser, main
from mlx_server.config.load import DEFAULT_PORT
from mlx_server.ops.client import chat_loop, cmd_run, http_client, human_size, relative_time, server_url
from support.serving import Server, free_port, make_config, serve


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("cli")
    # num_predict keeps every reply short; the tiny model rarely emits EOS on its own.
    config = make_config(tmp, {"tiny": {"source": str(tiny_llama), "aliases": ["t"],
                                        "options": {"num_predict": 6, "temperature": 0}}})
    with serve(config) as s:
        yield s


def config_path(server: Server) -> str:
    return str(server.app.state.ctx.config.path)


def test_config_is_accepted_before_and_after_the_subcommand() -> None:
    parser = build_parser()
    assert parser.parse_args(["serve", "--config", "/a.yaml"]).config == Path("/a.yaml")
    assert parser.parse_args(["--config", "/a.yaml", "serve", "--port", "1"]).config == Path("/a.yaml")
    assert parser.parse_args(["--config", "/a.yaml", "serve", "--config", "/b.yaml"]).config == Path("/b.yaml")
    assert parser.parse_args(["list", "--config", "/c.yaml", "--server", "h:1"]).server == "h:1"
    args = parser.parse_args(["run", "tiny", "say", "hi"])
    assert (args.model, args.prompt) == ("tiny", ["say", "hi"])


def test_server_url_precedence(tmp_path: Path) -> None:
    config = make_config(tmp_path, {}, host="0.0.0.0", port=12345)
    assert server_url(None, None, {}) == f"http://127.0.0.1:{DEFAULT_PORT}"
    assert server_url(None, config, {}) == "http://127.0.0.1:12345"  # a wildcard bind is reached via loopback
    assert server_url(None, config, {"MLX_SERVER_URL": "gpu.local"}) == f"http://gpu.local:{DEFAULT_PORT}"
    assert server_url("https://h:1/", config, {"MLX_SERVER_URL": "x:2"}) == "https://h:1"
    assert server_url("::1", None, {}) == f"http://[::1]:{DEFAULT_PORT}"
    assert server_url("[::1]:5", None, {}) == "http://[::1]:5"
    assert server_url(None, make_config(tmp_path, {}, host="::"), {}) == f"http://127.0.0.1:{DEFAULT_PORT}"


def test_formatting_like_ollama() -> None:
    assert [human_size(n) for n in (0, 999, 1_500, 397_000_000, 4_700_000_000)] == \
        ["0 B", "999 B", "1.5 KB", "397 MB", "4.7 GB"]
    now = dt.datetime(2026, 1, 10, tzinfo=dt.timezone.utc)
    ago = [relative_time(now - dt.timedelta(seconds=s), now) for s in (0.2, 30, 90, 600, 5000, 7200, 2 * 86400)]
    assert ago == ["Less than a second ago", "30 seconds ago", "About a minute ago", "10 minutes ago",
                   "About an hour ago", "2 hours ago", "2 days ago"]
    assert relative_time(now + dt.timedelta(minutes=4, seconds=30), now) == "4 minutes from now"


def test_list_from_the_server_and_from_disk(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", config_path(server), "list", "--server", server.url]) == 0
    live = capsys.readouterr().out.splitlines()
    assert live[0].split() == ["NAME", "ID", "SIZE", "MODIFIED"]
    name, digest, *rest = live[1].split()
    assert name == "tiny" and len(digest) == 12 and rest[1] == "KB" and live[1].endswith("ago")
    assert live[2].split()[:2] == ["t", digest]  # the alias, listed like the server lists it
    dead = f"http://127.0.0.1:{free_port()}"
    assert main(["--config", config_path(server), "ls", "--server", dead]) == 0
    captured = capsys.readouterr()
    first_columns = [ln.split("   ")[:3] for ln in live]  # MODIFIED may have ticked over a second
    assert [ln.split("   ")[:3] for ln in captured.out.splitlines()] == first_columns
    assert "no answer from" in captured.err
    assert main(["--config", "/nonexistent.yaml", "list", "--server", dead]) == 2  # named but unreadable


def test_ps(server: Server, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLX_SERVER_URL", server.url)
    with server.client() as c:
        assert c.post("/api/generate", json={"model": "tiny", "keep_alive": "10m"}).json()["done_reason"] == "load"
    assert main(["ps"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "ID", "SIZE", "PROCESSOR", "UNTIL"]
    assert lines[1].split()[0] == "tiny" and "100% GPU" in lines[1]
    assert lines[1].endswith("minutes from now")
    with server.client() as c:
        c.post("/api/generate", json={"model": "tiny", "keep_alive": -1})
    assert main(["ps"]) == 0
    assert capsys.readouterr().out.splitlines()[1].endswith("Forever")
    monkeypatch.setenv("MLX_SERVER_URL", f"http://127.0.0.1:{free_port()}")
    assert main(["ps"]) == 1
    assert "could not connect to mlx-server" in capsys.readouterr().err


def test_run_one_shot_streams_the_reply(server: Server, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # not a TTY, but a PROMPT is given
    assert main(["run", "t", "Hello", "there", "--server", server.url]) == 0
    reply = capsys.readouterr().out
    assert reply.strip() and reply.endswith("\n")
    with server.client() as c:
        expected = c.post("/api/chat", json={"model": "tiny", "stream": False,
                                             "messages": [{"role": "user", "content": "Hello there"}]}).json()
    assert reply == expected["message"]["content"] + "\n"


def test_run_reads_the_prompt_from_piped_stdin(server: Server, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there"))
    assert main(["run", "tiny", "--server", server.url]) == 0
    piped = capsys.readouterr().out
    assert main(["run", "tiny", "Hello there", "--server", server.url]) == 0
    assert piped == capsys.readouterr().out


def test_run_errors(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "nope", "hi", "--server", server.url]) == 1
    assert capsys.readouterr().err.strip() == 'Error: model "nope" not found'


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_interactive_chat_keeps_history_until_bye(server: Server) -> None:
    typed = iter(["Hello", "", "/clear", "Hi again", "And more", "/bye", "never read"])
    prompts: list[str] = []

    def read_line(prompt: str) -> Optional[str]:
        prompts.append(prompt)
        return next(typed)

    history: list[dict[str, str]] = []
    out, err = io.StringIO(), io.StringIO()
    with http_client(server.url, timeout=None) as client:
        assert chat_loop(client, "tiny", out, err, read_line, history) == 0
    assert prompts == [">>> "] * 6
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in history if m["role"] == "user"] == ["Hi again", "And more"]
    assert all(m["content"] for m in history)
    assert "Cleared session context" in err.getvalue()
    assert out.getvalue().count("\n\n") >= 3

    # Without a TTY the same entry point is one-shot; with one it is this loop (EOF ends it like /bye).
    out = io.StringIO()
    assert cmd_run(server.url, "tiny", None, stdin=FakeTTY(), out=out, err=io.StringIO(),
                   read_line=lambda p: None) == 0


def test_client_commands_send_the_api_key(tmp_path: Path, tiny_llama: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    config = make_config(tmp_path, {"tiny": {"source": str(tiny_llama)}}, api_key="sekret")
    monkeypatch.delenv("MLX_SERVER_API_KEY", raising=False)
    monkeypatch.delenv("MLX_SERVER_CONFIG", raising=False)
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    monkeypatch.chdir(empty)  # no ./models.yaml: the client runs without a config
    with serve(config) as server:
        assert main(["--config", str(config.path), "ps", "--server", server.url]) == 0  # key from the config
        assert main(["ps", "--server", server.url]) == 1
        assert "API key" in capsys.readouterr().err
        monkeypatch.setenv("MLX_SERVER_API_KEY", "sekret")
        assert main(["ps", "--server", server.url]) == 0
