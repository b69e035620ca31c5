#!/usr/bin/env python3
"""Run the real Codex CLI against this server, tool round trips included (issue 23's "done means"; not a test).

A random-weight model never calls a tool, so this builds a SCRIPTED one: a 1-layer llama whose attention and MLP
write nothing, so the last hidden state is the current token's (one-hot) embedding and `lm_head` alone picks the
next token — a fixed chain per token. Its vocabulary has one token per piece of the script, and its chat template
renders only markers, ending the prompt with <CALL> unless the last message is a tool result (then <ANSWER>):

    <CALL>   → <tool_call> → {"name": TOOL, "arguments": ARGS} → </tool_call> → EOS
    <ANSWER> → "The tool answered." → EOS

Two such models are served: `scripted` calls Codex's shell tool (`exec_command`, a top-level function), and
`scripted-ns` calls a member of a `namespace` tool (`multi_agent_v1.close_agent`; Codex routes it by the reply's
`name` + `namespace`, and its handler then rejects the made-up agent id: that it ran at all is the check). Each
goes through `codex exec` twice, with a custom provider (`wire_api = "responses"`) and with `--oss`
(`CODEX_OSS_BASE_URL`). A round trip passed when Codex exits 0, printed the model's final text, and the tool ran
(for the shell tool, its output "hello" shows in Codex's transcript).

Codex comes from npm (`@openai/codex`, --codex-version, installed once under --work); no account is needed (a
dummy key), and nothing leaves the machine: both providers point at this server.

    .venv/bin/python scripts/verify_codex.py            # ~1 min after Codex's one-off install
    .venv/bin/python scripts/verify_codex.py --codex /path/to/node_modules/.bin/codex
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import free_port  # noqa: E402
from benchserve import start_server, stop_server  # noqa: E402

ANSWER = "The tool answered."
EOS = "<|im_end|>"
MARKERS = ["<unk>", EOS, "<|im_start|>", "<TOOLS>", "<CALL>", "<ANSWER>"]


def build_scripted(out: Path, tool: str, arguments: dict[str, Any]) -> Path:
    call = "\n" + json.dumps({"name": tool, "arguments": arguments}) + "\n"
    vocab = [*MARKERS, "<tool_call>", "</tool_call>", call, ANSWER]
    ids = {t: i for i, t in enumerate(vocab)}
    chain = {"<CALL>": "<tool_call>", "<tool_call>": call, call: "</tool_call>", "<ANSWER>": ANSWER}
    width, heads, kv_heads, inner = 32, 4, 2, 64
    head_dim = width // heads
    embed = np.eye(len(vocab), width, dtype=np.float32)
    lm_head = np.zeros((len(vocab), width), np.float32)
    for i, token in enumerate(vocab):
        lm_head[ids[chain.get(token, EOS)], i] = 20.0  # the normed hidden state is √width·e_i: a margin of ~113
    zeros = {
        "self_attn.q_proj": (heads * head_dim, width),
        "self_attn.k_proj": (kv_heads * head_dim, width),
        "self_attn.v_proj": (kv_heads * head_dim, width),
        "self_attn.o_proj": (width, heads * head_dim),
        "mlp.gate_proj": (inner, width),
        "mlp.up_proj": (inner, width),
        "mlp.down_proj": (width, inner),
    }
    weights: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": embed,
        "lm_head.weight": lm_head,
        "model.norm.weight": np.ones(width),
    }
    weights |= {f"model.layers.0.{k}.weight": np.zeros(shape, np.float32) for k, shape in zeros.items()}
    weights |= {f"model.layers.0.{k}.weight": np.ones(width) for k in ("input_layernorm", "post_attention_layernorm")}
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.astype(np.float32) for k, v in weights.items()}, str(out / "model.safetensors"))
    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": width, "num_hidden_layers": 1,
        "intermediate_size": inner, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": head_dim, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "vocab_size": len(vocab),
        "hidden_act": "silu", "torch_dtype": "float32", "rope_theta": 10000.0, "tie_word_embeddings": False,
        "eos_token_id": ids[EOS],
    }  # fmt: skip
    (out / "config.json").write_text(json.dumps(config))
    added = [
        {"id": ids[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": t in MARKERS}
        for t in [*MARKERS, "<tool_call>", "</tool_call>"]
    ]  # fmt: skip
    tokenizer = {
        "version": "1.0", "added_tokens": added, "normalizer": None, "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None, "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": ids, "unk_token": "<unk>"},
    }  # fmt: skip
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    # The comment's `<tool_call>` and `tool_call.name` are what mlx_lm reads a json_tools model from.
    template = (
        '{#- calls: <tool_call>{"name": tool_call.name, "arguments": …}</tool_call> -#}'
        "{%- if tools %}<TOOLS>{%- endif %}{%- for m in messages %}<|im_start|>{%- endfor %}"
        "{%- if add_generation_prompt %}{%- if messages[-1].role == 'tool' %}<ANSWER>{%- else %}<CALL>"
        "{%- endif %}{%- endif %}"
    )
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template, "eos_token": EOS,
        "pad_token": "<unk>", "unk_token": "<unk>", "model_max_length": 32768, "tool_parser_type": "json_tools",
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added},
    }  # fmt: skip
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return out


def install_codex(work: Path, version: str) -> Path:
    binary = work / "npm" / "node_modules" / ".bin" / "codex"
    if not binary.exists():
        if shutil.which("npm") is None:
            raise SystemExit("npm is needed to install the Codex CLI (or pass --codex)")
        subprocess.run(["npm", "install", "--prefix", str(work / "npm"), f"@openai/codex@{version}"], check=True)
    return binary


def codex_exec(codex: Path, work: Path, url: str, model: str, oss: bool, prompt: str) -> tuple[int, str]:
    home = work / f"home-{model}-{'oss' if oss else 'provider'}"
    shutil.rmtree(home, ignore_errors=True)
    (home / ".codex").mkdir(parents=True)
    env = {**os.environ, "HOME": str(home), "OPENAI_API_KEY": "dummy"}
    args = [str(codex), "exec", "--skip-git-repo-check", "--dangerously-bypass-approvals-and-sandbox"]
    if oss:
        env["CODEX_OSS_BASE_URL"] = f"{url}/v1"
        args += ["--oss", "--local-provider", "ollama", "-m", model]
    else:
        (home / ".codex" / "config.toml").write_text(
            f'model = "{model}"\nmodel_provider = "mlx"\n\n[model_providers.mlx]\nname = "mlx-server"\n'
            f'base_url = "{url}/v1"\nwire_api = "responses"\nrequest_max_retries = 0\nstream_max_retries = 0\n'
        )
    scratch = work / "workdir"
    scratch.mkdir(exist_ok=True)
    run = subprocess.run([*args, prompt], env=env, cwd=scratch, capture_output=True, text=True, timeout=300)
    return run.returncode, run.stdout + run.stderr


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "mlx-server" / "verify-codex")
    ap.add_argument("--codex", type=Path, help="a codex binary (default: npm-install --codex-version under --work)")
    ap.add_argument("--codex-version", default="0.171.0")
    args = ap.parse_args()
    work: Path = args.work
    codex = args.codex or install_codex(work, args.codex_version)
    version = subprocess.run([str(codex), "--version"], capture_output=True, text=True).stdout.strip()
    models = {
        "scripted": build_scripted(work / "scripted", "exec_command", {"cmd": "echo hello"}),
        "scripted-ns": build_scripted(work / "scripted-ns", "multi_agent_v1.close_agent", {"target": "nobody"}),
    }
    port = free_port()
    doc = {
        "server": {"port": port, "cache_dir": str(work / "cache"), "memory_budget": "2GB"},
        "models": {name: {"source": str(path), "context_length": 32768} for name, path in models.items()},
    }
    proc, url, log = start_server(work / "server", doc, port, env={"HF_HUB_OFFLINE": "1"})
    failures = 0
    try:
        print(f"{version}, server {url} (log {log})")
        for model, ran in (("scripted", "hello"), ("scripted-ns", "invalid agent id")):
            for oss in (False, True):
                rc, out = codex_exec(codex, work, url, model, oss, "Use the tool.")
                ok = rc == 0 and ANSWER in out and ran in out and "unsupported call" not in out
                failures += not ok
                mode = "--oss" if oss else "wire_api=responses"
                print(f"{model:12} {mode:20} exit {rc}  {'round trip OK' if ok else 'FAILED'}")
                if not ok:
                    print("\n".join("    " + line for line in out.splitlines()[-25:]))
    finally:
        stop_server(proc)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
