"""Structured output that is enforced: a grammar masks every sampled token of a sequence.

Library choice: llguidance. It is a Rust Earley parser with a lazy lexer that computes a token mask in tens of
microseconds straight from a JSON schema or a Lark grammar, with no per-schema precompilation over the vocabulary
(outlines-core builds a regex index over the whole vocabulary per schema, slow for large vocabularies and without
recursive schemas) and no torch dependency (xgrammar's Python package requires torch and its mask helpers target
torch/CUDA tensors). Its masks are plain bitsets, so applying them to MLX logits is one `mx.where`, on Metal and on
the CPU backend alike (its own `llguidance.mlx` helper is a Metal-only kernel, so it is not used). It is what
llama.cpp, vLLM and SGLang ship for the same job.

Each constrained sequence gets its own matcher inside a per-sequence logits processor, so it shares decode steps
with unconstrained sequences of the same BatchGenerator. When the grammar is complete the mask allows only EOS,
which ends the sequence. Near the token budget the processor steers toward closing the JSON (close the open
string, then brackets, then EOS) so a reply cut by `max_tokens` is still rare rather than common.
"""

from __future__ import annotations

import copy
import json
import logging
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional, cast

import mlx.core as mx
import numpy as np

from mlx_server.contract.errors import BadRequest
from mlx_server.contract.requests import GenerateRequest
from mlx_server.engine.prepare.parsers import (
    GENERIC_JSON,
    ToolFormat,
    forced_tool_format,
    function_defs,
    tool_format_for,
)

log = logging.getLogger("mlx_server.engine.prepare.constrained")

Processor = Callable[[mx.array, mx.array], mx.array]

# Compact JSON with at most one space, or a newline and a little indentation, between tokens: enough for the
# shapes models like to write, never an unbounded run of whitespace that eats the token budget.
JSON_OPTIONS: Mapping[str, Any] = MappingProxyType(
    {"whitespace_flexible": False, "whitespace_pattern": r"(?: |\n {0,8})?"}
)
_CLOSERS = frozenset(b"]}")


class Vocab:
    """What the masks need to know about one tokenizer, built once per loaded model on first use."""

    def __init__(self, tokenizer: Any) -> None:
        import llguidance
        import llguidance.hf

        hf = getattr(tokenizer, "_tokenizer", tokenizer)
        self.size = len(tokenizer)
        self.eos = sorted(tokenizer.eos_token_ids)
        try:
            self.ll = llguidance.hf.from_tokenizer(hf, n_vocab=self.size, eos_token=self.eos)
        except Exception as exc:  # noqa: BLE001 - slow/sentencepiece-only tokenizers cannot be wrapped
            raise BadRequest(f"structured output is not supported for this model's tokenizer: {exc}") from None
        self._tokenizer = tokenizer
        pieces = [self.ll.decode_bytes([i]) for i in range(self.size)]
        self.pieces = pieces
        # Token classes the budget-closing heuristic prefers, as boolean masks over the vocabulary.
        self.closer = np.array([bool(p) and set(p) <= _CLOSERS for p in pieces])
        self.quote_close = np.array([p[:1] == b'"' and set(p[1:]) <= _CLOSERS | {ord('"')} for p in pieces])
        self.comma = np.array([p[:1] == b"," for p in pieces])
        self.eos_mask = np.zeros(self.size, dtype=bool)
        self.eos_mask[[e for e in self.eos if e < self.size]] = True

    def marker(self, text: str) -> str:
        """A Lark term for a tool-call marker: llguidance only emits added tokens when named by id."""
        ids = self._tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == 1 and self.ll.is_special_token(ids[0]):
            return f"<[{ids[0]}]>"
        return json.dumps(text, ensure_ascii=False)

    def matcher(self, grammar: str) -> Any:
        import llguidance

        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.ll)
        if is_error:
            raise BadRequest(f"invalid format / schema: {messages[0] if messages else 'rejected'}")
        m = llguidance.LLMatcher(self.ll, grammar, log_level=0)
        if m.is_error():
            raise BadRequest(f"invalid format / schema: {m.get_error()}")
        return m


class JsonCursor:
    """Just enough JSON lexing of the output to know whether we are inside a string and how deep we are."""

    def __init__(self) -> None:
        self.in_string = False
        self.escaped = False
        self.depth = 0

    def feed(self, piece: bytes) -> None:
        for b in piece:
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif b == 0x5C:  # backslash
                    self.escaped = True
                elif b == 0x22:
                    self.in_string = False
            elif b == 0x22:
                self.in_string = True
            elif b in (0x7B, 0x5B):
                self.depth += 1
            elif b in (0x7D, 0x5D):
                self.depth = max(0, self.depth - 1)


class GrammarProcessor:
    """A BatchGenerator logits processor: (tokens so far, logits) → logits with disallowed tokens at -inf.

    The first call sees the prompt; each later call sees exactly one more token, the one sampled last step,
    which the matcher consumes before the next mask is computed.
    """

    def __init__(self, vocab: Vocab, matcher: Any, max_tokens: int) -> None:
        self.vocab = vocab
        self.matcher = matcher
        self.max_tokens = max_tokens
        self.base: Optional[int] = None
        self.generated = 0
        self.cursor = JsonCursor()

    def __call__(self, context: mx.array, logits: mx.array) -> mx.array:
        n = int(context.shape[-1])
        if self.base is None:
            self.base = n
        else:
            for token in cast(list[int], context[self.base + self.generated :].tolist()):
                self._consume(token)
        allowed = self._allowed(logits.shape[-1])
        return mx.where(mx.array(allowed), logits, mx.array(-float("inf"), dtype=logits.dtype))

    def _consume(self, token: int) -> None:
        self.generated += 1
        if self.matcher.is_stopped() or self.matcher.is_error():
            return  # the sequence is ending on EOS; nothing more to track
        if not self.matcher.consume_token(token):
            log.warning("grammar rejected token %d: %s", token, self.matcher.get_error())
            return
        if token < self.vocab.size:
            self.cursor.feed(self.vocab.pieces[token])

    def _allowed(self, width: int) -> np.ndarray:
        v = self.vocab
        if self.matcher.is_error():
            allowed = v.eos_mask.copy()  # cannot happen with masked sampling; end rather than emit garbage
        else:
            bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
            allowed = np.unpackbits(bits, bitorder="little")[: v.size].astype(bool)
            if self._closing():
                allowed = self._prefer_closing(allowed)
        if width != v.size:  # padded embedding rows past the tokenizer are never valid
            out = np.zeros(width, dtype=bool)
            out[: min(width, v.size)] = allowed[:width]
            allowed = out
        return allowed

    def _closing(self) -> bool:
        left = self.max_tokens - self.generated
        reserve = min(48, max(10, self.max_tokens // 4)) + 2 * self.cursor.depth
        return left <= reserve

    def _prefer_closing(self, allowed: np.ndarray) -> np.ndarray:
        v, c = self.vocab, self.cursor
        if c.in_string:
            ranks = [] if c.escaped else [v.quote_close]
        else:
            ranks = [v.closer, v.comma]
        for pref in (v.eos_mask, *ranks):
            narrowed = allowed & pref
            if narrowed.any():
                return narrowed
        return allowed


# ---- grammars -------------------------------------------------------------------------------------------------


def _with_options(schema: dict[str, Any]) -> dict[str, Any]:
    schema = copy.deepcopy(schema)
    guidance = dict(JSON_OPTIONS)
    guidance.update(schema.get("x-guidance") or {})
    schema["x-guidance"] = guidance
    return schema


def json_grammar(fmt: Any) -> str:
    """Ollama `format` / OpenAI `response_format`: "json" (any JSON object) or a JSON schema."""
    import llguidance

    if fmt == "json":
        schema: dict[str, Any] = {"type": "object"}
    elif isinstance(fmt, dict):
        schema = fmt
    else:
        raise BadRequest('format must be "json" or a JSON schema object')
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(_with_options(schema))
    except ValueError as exc:
        raise BadRequest(f"invalid JSON schema: {exc}") from None


def tool_call_grammar(
    fmt: ToolFormat, tools: list[dict[str, Any]], name: Optional[str], marker: Callable[[str], str]
) -> Optional[str]:
    """A grammar that forces one call (to `name`, or to any of `tools`) in format `fmt`.

    Only formats whose call is JSON can be forced (None for others); `forced_tool_format` picks one that can.
    """
    import llguidance

    defs = function_defs(tools, name)
    if name is not None and not defs:
        raise BadRequest(f"tool_choice names a tool that is not in tools: {name!r}")
    if not defs:
        raise BadRequest("a tool call was required but no tools were given")
    args_key = "parameters" if fmt.name == "llama3_json" else "arguments"
    shared_defs: dict[str, Any] = {}
    variants = []
    for d in defs:
        params = copy.deepcopy(d.get("parameters") or {"type": "object"})
        for key in ("$defs", "definitions"):  # refs are resolved against the root we build, so lift them
            shared_defs.setdefault(key, {}).update(params.pop(key, {}) or {})
        if params.get("properties") and "additionalProperties" not in params:
            # Undeclared arguments are useless to the caller (and some clients drop the keyword on the way).
            params["additionalProperties"] = False
        variants.append(
            {
                "type": "object",
                "properties": {"name": {"const": d.get("name")}, args_key: params},
                "required": ["name", args_key],
                "additionalProperties": False,
            }
        )
    schema: dict[str, Any] = variants[0] if len(variants) == 1 else {"anyOf": variants}
    schema.update({k: v for k, v in shared_defs.items() if v})
    call = "%json " + json.dumps(_with_options(schema), ensure_ascii=False)
    if fmt.name == "json_tools":
        lark = f'start: {marker(fmt.start)} "\\n" call "\\n" {marker(fmt.end)}\ncall: {call}\n'
    elif fmt.name in ("llama3_json", GENERIC_JSON.name):
        lark = f"start: call\ncall: {call}\n"
    else:
        log.info("cannot force a tool call in the %s format; leaving it to the model", fmt.name)
        return None
    return llguidance.LLMatcher.grammar_from_lark(lark)


class Constraints:
    """Per-model factory of grammar processors, kept by the preparation stage: the vocabulary scan is done once."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.tool_format = tool_format_for(tokenizer)
        self._vocab: Optional[Vocab] = None

    @property
    def vocab(self) -> Vocab:
        if self._vocab is None:
            self._vocab = Vocab(self.tokenizer)
        return self._vocab

    def grammar(self, req: GenerateRequest) -> Optional[str]:
        if req.force_tool is not None and req.tools:
            # A required call is always forced: in the model's own format when it is JSON, else as generic JSON
            # (which make_output reads back and prompt.render describes when the template cannot show tools).
            fmt = forced_tool_format(self.tool_format)
            if fmt is not self.tool_format:
                log.debug(
                    "forcing a generic JSON tool call (model format: %s)",
                    self.tool_format.name if self.tool_format else "none",
                )
            grammar = tool_call_grammar(fmt, req.tools, req.force_tool.name, self.vocab.marker)
            if grammar is not None:
                return grammar
        if req.format is not None:
            return json_grammar(req.format)
        return None

    def processors(self, req: GenerateRequest, max_tokens: int) -> list[Processor]:
        """[] for unconstrained requests; raises BadRequest for a schema the grammar compiler rejects."""
        grammar = self.grammar(req)
        if grammar is None:
            return []
        vocab = self.vocab
        return [GrammarProcessor(vocab, vocab.matcher(grammar), max_tokens)]


__all__ = ["Constraints", "GrammarProcessor", "JSON_OPTIONS", "JsonCursor", "json_grammar", "tool_call_grammar"]
