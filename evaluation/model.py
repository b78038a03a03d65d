"""The model every evaluation task talks to: an HF causal-LM checkpoint (ours, exported from
Megatron, or SmolLM2) with three primitives, in lm-eval's conventions:

- ``loglikelihood([(context, continuation)])`` → (sum of log-probs, is-greedy). No BOS; trailing
  spaces of the context move to the continuation; the continuation's tokens are those of
  ``context + continuation`` after the context's own token count.
- ``loglikelihood_rolling([text])`` → (sum of log-probs, token count) over disjoint windows of
  ``max_length`` tokens, the first conditioned on a prefix token (BOS, else EOS).
- ``generate_until([prompt], until, max_new_tokens)`` → greedy continuations cut at the first stop
  sequence, never longer than ``max_new_tokens`` tokens.

Requests that share a context are scored with one pass over the context and its KV cache reused
for every continuation, and only the scored positions go through the LM head. Generation uses vLLM
when it is installed (``generation_backend="auto"``) and a batched greedy loop otherwise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from training.models import PRECISION_DTYPES, ModelSourceError, resolve_model

log = logging.getLogger("refinery.eval.model")
_HEAD_CHUNK = 1024  # scored positions per LM-head call


class EvalModelError(ValueError):
    """A checkpoint that cannot be evaluated (no config, no tokenizer, ...)."""


def _tqdm(iterable=None, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs)


def rolling_windows(tokens: list[int], prefix_token: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) windows that together predict every token exactly once.

    The first window predicts ``tokens[:max_length]`` after ``prefix_token``; each later one
    predicts the next ``max_length`` tokens after the single token before them — lm-eval's
    ``get_rolling_token_windows(context_len=1)`` followed by ``make_disjoint_window``.
    """
    windows = []
    if not tokens:
        return windows
    first = min(max_length, len(tokens))
    windows.append(([prefix_token], tokens[:first]))
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_length)
        end = done + n
        ctx = tokens[end - max_length - 1 : end - 1]
        windows.append((ctx[: len(ctx) - (n - 1)], tokens[end - n : end]))
        done = end
    return windows


@dataclass
class _Group:
    """Continuations that share one context (scored with one context pass)."""

    context: list[int]
    items: list[tuple[int, list[int]]]  # (request index, continuation tokens)


class EvalModel:
    """An HF causal LM on CPU (or the given device) with lm-eval-compatible scoring primitives."""

    def __init__(
        self,
        path: str | Path,
        batch_size: int = 16,
        max_length: int | None = None,
        precision: str = "fp32",
        device: str = "cpu",
        generation_backend: str = "auto",
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            self.path = resolve_model(path)
        except ModelSourceError as exc:
            raise EvalModelError(f"cannot evaluate {str(path)!r}: {exc}") from None
        if generation_backend not in ("auto", "hf", "vllm"):
            raise EvalModelError(f"generation_backend must be auto, hf or vllm (got {generation_backend!r})")
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModelForCausalLM.from_pretrained(self.path, dtype=getattr(torch, PRECISION_DTYPES[precision])).to(device)
        self.model.eval()
        self.device = torch.device(device)
        self.precision = precision
        self.batch_size = max(1, int(batch_size))
        config_max = getattr(self.model.config, "max_position_embeddings", None) or 2048
        self.max_length = int(max_length or config_max)
        tok = self.tokenizer
        self.eos_token_id = tok.eos_token_id if tok.eos_token_id is not None else self.model.config.eos_token_id
        if self.eos_token_id is None:
            raise EvalModelError(f"{self.path}: tokenizer and config define no EOS token")
        self.prefix_token_id = tok.bos_token_id if tok.bos_token_id is not None else self.eos_token_id
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_token_id
        self.generation_backend = generation_backend
        self._vllm = None

    # ---- tokenization -------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids without special tokens (no BOS), lm-eval's convention for SmolLM2/GPT-2 style."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's ``_encode_pair``: split ``context + continuation`` at the context's token count."""
        if not context:
            return [self.prefix_token_id], self.encode(continuation)
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.encode(context + continuation)
        context_enc = self.encode(context)
        return context_enc, whole[len(context_enc):]

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The tokenizer's chat template applied to ``messages`` with the generation prompt."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise EvalModelError(f"{self.path}: the tokenizer has no chat template (set chat_template: false)")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    # ---- log-likelihood -----------------------------------------------------------------
    def loglikelihood(self, requests: Sequence[tuple[str, str]], progress: bool = True) -> list[tuple[float, bool]]:
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in requests], progress=progress)

    def loglikelihood_rolling(
        self, texts: Sequence[str], window: int | None = None, progress: bool = True
    ) -> list[tuple[float, int]]:
        """(summed log-prob, number of predicted tokens) of each whole text, in windows of
        ``window`` tokens (default ``max_length``)."""
        window = min(window or self.max_length, self.max_length)
        windows, owners = [], []
        for i, text in enumerate(texts):
            for w in rolling_windows(self.encode(text), self.prefix_token_id, window):
                windows.append(w)
                owners.append(i)
        scores = self.loglikelihood_tokens(windows, progress=progress)
        totals = [[0.0, 0] for _ in texts]
        for i, (ctx, cont), (lp, _) in zip(owners, windows, scores):
            totals[i][0] += lp
            totals[i][1] += len(cont)
        return [(lp, n) for lp, n in totals]

    def loglikelihood_tokens(
        self, requests: Sequence[tuple[list[int], list[int]]], progress: bool = True
    ) -> list[tuple[float, bool]]:
        """Score token-level (context, continuation) pairs; contexts shared by several requests run once."""
        import torch

        results: list[tuple[float, bool] | None] = [None] * len(requests)
        groups: dict[tuple[int, ...], _Group] = {}
        for i, (ctx, cont) in enumerate(requests):
            if not ctx or not cont:
                raise ValueError(f"request {i}: context and continuation must both be non-empty")
            ctx, cont = self._truncate(list(ctx), list(cont))
            key = tuple(ctx)
            groups.setdefault(key, _Group(list(ctx), [])).items.append((i, cont))
        ordered = sorted(groups.values(), key=lambda g: -(len(g.context) + max(len(c) for _, c in g.items)))
        bar = _tqdm(total=len(requests), desc="loglikelihood", disable=not progress, leave=False)
        batch: list[_Group] = []
        rows = 0
        with torch.inference_mode():
            for group in ordered:
                batch.append(group)
                rows += len(group.items)
                if rows >= self.batch_size:
                    self._score_groups(batch, results)
                    bar.update(rows)
                    batch, rows = [], 0
            if batch:
                self._score_groups(batch, results)
                bar.update(rows)
        bar.close()
        return results  # type: ignore[return-value]

    def _truncate(self, ctx: list[int], cont: list[int]) -> tuple[list[int], list[int]]:
        """Keep the last ``max_length + 1`` tokens of context+continuation, as lm-eval does."""
        overflow = len(ctx) + len(cont) - (self.max_length + 1)
        if overflow <= 0:
            return ctx, cont
        if len(cont) > self.max_length:
            raise ValueError(f"continuation of {len(cont)} tokens exceeds max_length {self.max_length}")
        return ctx[overflow:], cont

    def _score_groups(self, groups: list[_Group], results: list) -> None:
        """Two passes: contexts (right-padded, KV cache kept), then every continuation on its context's cache."""
        import torch

        dev = self.device
        base = self.model.base_model
        head = self.model.get_output_embeddings()
        ctx_lens = torch.tensor([len(g.context) for g in groups], device=dev)
        lc = int(ctx_lens.max())
        ctx_ids = torch.full((len(groups), lc), self.pad_token_id, dtype=torch.long, device=dev)
        ctx_mask = torch.zeros((len(groups), lc), dtype=torch.long, device=dev)
        for r, g in enumerate(groups):
            ctx_ids[r, : len(g.context)] = torch.tensor(g.context)
            ctx_mask[r, : len(g.context)] = 1
        out = base(input_ids=ctx_ids, attention_mask=ctx_mask, use_cache=True)
        last_hidden = out.last_hidden_state[torch.arange(len(groups), device=dev), ctx_lens - 1]
        first_logp = torch.log_softmax(head(last_hidden).float(), dim=-1)  # predicts each continuation's 1st token

        rows = [(r, i, cont) for r, g in enumerate(groups) for i, cont in g.items]
        row_group = torch.tensor([r for r, _, _ in rows], device=dev)
        lt = max(len(cont) for _, _, cont in rows) - 1  # continuation tokens fed to the model
        rest_logp = rest_greedy = None
        if lt > 0:
            cont_ids = torch.full((len(rows), lt), self.pad_token_id, dtype=torch.long, device=dev)
            cont_mask = torch.zeros((len(rows), lt), dtype=torch.long, device=dev)
            for k, (_, _, cont) in enumerate(rows):
                n = len(cont) - 1
                if n:
                    cont_ids[k, :n] = torch.tensor(cont[:-1])
                    cont_mask[k, :n] = 1
            cache = out.past_key_values
            cache.batch_select_indices(row_group)
            positions = ctx_lens[row_group].unsqueeze(1) + torch.arange(lt, device=dev).unsqueeze(0)
            hidden = base(
                input_ids=cont_ids,
                attention_mask=torch.cat([ctx_mask[row_group], cont_mask], dim=1),
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            ).last_hidden_state[cont_mask.bool()]  # scored positions only, row by row
            targets = torch.tensor([t for _, _, cont in rows for t in cont[1:]], device=dev)
            rest_logp, rest_greedy = [], []
            for s in range(0, len(targets), _HEAD_CHUNK):  # one LM-head matmul per chunk, bounded memory
                logp = torch.log_softmax(head(hidden[s : s + _HEAD_CHUNK]).float(), dim=-1)
                tgt = targets[s : s + _HEAD_CHUNK]
                rest_logp.append(logp.gather(1, tgt.unsqueeze(1)).squeeze(1))
                rest_greedy.append(logp.argmax(-1) == tgt)
            rest_logp, rest_greedy = torch.cat(rest_logp).tolist(), torch.cat(rest_greedy).tolist()
        pos = 0
        for r, i, cont in rows:
            n = len(cont) - 1
            first = first_logp[r]
            total = float(first[cont[0]]) + (sum(rest_logp[pos : pos + n]) if n else 0.0)
            greedy = int(first.argmax()) == cont[0] and (all(rest_greedy[pos : pos + n]) if n else True)
            results[i] = (total, greedy)
            pos += n

    # ---- generation ---------------------------------------------------------------------
    def generate_until(
        self, prompts: Sequence[str], until: Iterable[str] = (), max_new_tokens: int = 256, progress: bool = True
    ) -> list[str]:
        """Greedy continuations of ``prompts``, cut before the first stop sequence (or EOS)."""
        stops = [s for s in until if s]
        if max_new_tokens >= self.max_length:
            log.warning("max_new_tokens %d >= max_length %d: generating %d", max_new_tokens, self.max_length, self.max_length // 2)
            max_new_tokens = self.max_length // 2
        if self.generation_backend in ("auto", "vllm"):
            engine = self._vllm_engine()
            if engine is not None:
                return self._generate_vllm(engine, prompts, stops, max_new_tokens)
        return self._generate_hf(prompts, stops, max_new_tokens, progress)

    def _vllm_engine(self):
        """A vLLM engine over this checkpoint, or None (with a log line) where vLLM is unavailable."""
        if self._vllm is None:
            try:
                from training.rl.rollout import VLLMEngine

                # the rollout engine's recipe: in-process, KV cache capped (vLLM's CPU default reserves most of RAM)
                self._vllm = VLLMEngine(self.path, self.precision, seed=0, max_model_len=self.max_length).llm
            except Exception as exc:  # not installed, no CPU build, unsupported model ...
                if self.generation_backend == "vllm":
                    raise EvalModelError(f"generation_backend 'vllm' requested but unavailable: {exc}") from exc
                log.info("vLLM unavailable (%s: %s); generating with transformers", type(exc).__name__, exc)
                self._vllm = False
        return self._vllm or None

    def _generate_vllm(self, engine, prompts: Sequence[str], stops: list[str], max_new_tokens: int) -> list[str]:
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop=stops or None)
        inputs = [{"prompt_token_ids": self._prompt_ids(p, max_new_tokens)} for p in prompts]
        outputs = engine.generate(inputs, params)
        return [cut_at_stop(o.outputs[0].text, stops) for o in outputs]

    def _prompt_ids(self, prompt: str, max_new_tokens: int) -> list[int]:
        keep = self.max_length - max_new_tokens
        if keep <= 0:
            raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room in max_length {self.max_length}")
        return self.encode(prompt)[-keep:]

    def _generate_hf(self, prompts: Sequence[str], stops: list[str], max_new_tokens: int, progress: bool) -> list[str]:
        encoded = [self._prompt_ids(p, max_new_tokens) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
        results: list[str] = [""] * len(prompts)
        bar = _tqdm(total=len(prompts), desc="generate", disable=not progress, leave=False)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            for i, text in zip(idx, self._greedy_batch([encoded[i] for i in idx], stops, max_new_tokens)):
                results[i] = text
            bar.update(len(idx))
        bar.close()
        return results

    def _greedy_batch(self, prompts: list[list[int]], stops: list[str], max_new_tokens: int) -> list[str]:
        """Greedy decoding with a KV cache; a row leaves the batch as soon as it stops."""
        import torch

        dev = self.device
        n = len(prompts)
        width = max(len(p) for p in prompts)
        ids = torch.full((n, width), self.pad_token_id, dtype=torch.long, device=dev)
        mask = torch.zeros((n, width), dtype=torch.long, device=dev)
        for r, p in enumerate(prompts):  # left padding: every row's next token is at the same column
            ids[r, width - len(p) :] = torch.tensor(p)
            mask[r, width - len(p) :] = 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        generated: list[list[int]] = [[] for _ in range(n)]
        active = list(range(n))
        cache = None
        with torch.inference_mode():
            for _ in range(max_new_tokens):
                out = self.model(
                    input_ids=ids, attention_mask=mask, position_ids=positions,
                    past_key_values=cache, use_cache=True, logits_to_keep=1,
                )
                cache = out.past_key_values
                next_tokens = out.logits[:, -1].argmax(-1)
                keep = []
                for k, row in enumerate(active):
                    tok = int(next_tokens[k])
                    if tok == self.eos_token_id:
                        continue
                    generated[row].append(tok)
                    if stops and _hits_stop(self.tokenizer.decode(generated[row][-32:]), stops):
                        continue
                    keep.append(k)
                if not keep:
                    break
                if len(keep) < len(active):
                    sel = torch.tensor(keep, device=dev)
                    cache.batch_select_indices(sel)
                    next_tokens, mask, positions = next_tokens[sel], mask[sel], positions[sel]
                    active = [active[k] for k in keep]
                ids = next_tokens.unsqueeze(1)
                mask = torch.cat([mask, torch.ones((len(active), 1), dtype=mask.dtype, device=dev)], dim=1)
                positions = positions[:, -1:] + 1
        return [cut_at_stop(self.tokenizer.decode(g, skip_special_tokens=True), stops) for g in generated]


def _hits_stop(text: str, stops: list[str]) -> bool:
    return any(s in text for s in stops)


def cut_at_stop(text: str, stops: Iterable[str]) -> str:
    """``text`` up to (not including) the earliest stop sequence."""
    cut = len(text)
    for s in stops:
        if s:
            pos = text.find(s)
            if pos != -1:
                cut = min(cut, pos)
    return text[:cut]
