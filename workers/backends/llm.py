"""`text.generate`: any transformers causal LM, many jobs decoded together.

`generate()` shares one sampler, one streamer and one stop rule across a batch, so this
backend runs its own decode loop over a KV cache: each row has its own seeded
generator, temperature, top_p, stop strings, token stream and cancel. Rows that finish
leave the batch (their cache rows are dropped), so the rest run at the smaller size, and
their jobs end there and then (`predict_each`), not with the batch's longest row.
A batch that runs out of device memory goes on in halves (`_decode_fitting`).
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from spool import metrics
from spool.registry import ModelSpec
from workers.backends import hf
from workers.backends.base import (
    Admit,
    Backend,
    Deliver,
    JobContext,
    OutOfMemory,
    Result,
    register,
)


@dataclass
class _Row:
    index: int
    ctx: JobContext
    prompt_ids: list[int]
    max_new: int
    min_new: int
    temperature: float
    top_p: float
    stop: list[str]
    generator: torch.Generator
    ids: list[int] = field(default_factory=list)
    text: str = ""  # decoded completion so far
    sent: int = 0  # how much of `text` went out as tokens
    prefix_offset: int = 0  # incremental detokenization window over `ids`
    read_offset: int = 0
    finish: str | None = None
    result: Result | None = None
    delivered: bool = False


def _hand_over(row: _Row, deliver: Deliver) -> None:
    row.delivered = True
    deliver(row.index, row.result if row.result is not None else RuntimeError("job was not run"))


def _trim(cache: Any, mask: torch.Tensor) -> torch.Tensor:
    """Drop the columns of a plain cache that are padding for every row left (in place);
    returns the mask to match. Rows joining a running loop are padded to its width:
    without this, a loop that keeps taking in jobs would attend over an ever longer cache."""
    first = int(mask.any(dim=0).to(torch.int8).argmax())  # rows are right-aligned
    if first == 0:
        return mask
    for layer in cache.layers:
        layer.keys = layer.keys[:, :, first:, :]
        layer.values = layer.values[:, :, first:, :]
    return mask[:, first:]


def _merge(
    cache: Any,
    mask: torch.Tensor,
    last: torch.Tensor,
    other: Any,
    mask2: torch.Tensor,
    last2: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Append `other`'s rows to `cache` (in place), both left-padded to the longer one:
    a row attends to its own tokens only (the mask), and its positions are its own
    (`last`), so the padding changes nothing it sees. Returns the merged mask and last."""
    width = max(mask.shape[1], mask2.shape[1])

    def left(t: torch.Tensor, dim_from_end: int) -> torch.Tensor:
        pad = [0, 0] * (dim_from_end - 1) + [width - t.shape[-dim_from_end], 0]
        return torch.nn.functional.pad(t, pad)

    for mine, theirs in zip(cache.layers, other.layers, strict=True):
        mine.keys = torch.cat([left(mine.keys, 2), left(theirs.keys, 2)])
        mine.values = torch.cat([left(mine.values, 2), left(theirs.values, 2)])
    return torch.cat([left(mask, 1), left(mask2, 1)]), torch.cat([last, last2])


@register
class LLMBackend(Backend):
    kind = "text.generate"

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self.model: Any = None
        self.tokenizer: Any = None
        self.device = torch.device("cpu")
        self.eos_ids: set[int] = set()
        self._eos_index = torch.empty(0, dtype=torch.long)
        self.context_len: int | None = None
        self._lock = threading.Lock()
        # Whether the model's KV cache is plain tensors (no sliding-window or other layer
        # kinds): only then do jobs join a running loop and padding columns get trimmed.
        self._plain_cache = False

    def setup(self) -> None:
        hf.prepare_process()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = hf.device_for(self.spec)
        dtype = hf.dtype_for(self.spec, self.device)
        source = hf.model_source(self.spec)
        try:
            kwargs = hf.load_kwargs(self.spec)
            with hf.LOAD_LOCK:
                tokenizer = AutoTokenizer.from_pretrained(
                    source, local_files_only=kwargs["local_files_only"]
                )
                model: Any = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
                model = model.to(self.device).eval()
        except Exception as exc:  # any failure here means the model is unusable
            raise hf.load_failed(self.spec, source, exc) from exc
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        eos = model.generation_config.eos_token_id
        eos_list = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {i for i in [*eos_list, tokenizer.eos_token_id] if i is not None}
        self._eos_index = torch.tensor(sorted(self.eos_ids), dtype=torch.long, device=self.device)
        self.context_len = getattr(model.config, "max_position_embeddings", None)
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        layers = DynamicCache(config=model.config).layers  # the kinds the config asks for
        self._plain_cache = all(type(layer) is DynamicLayer for layer in layers)
        # Newer transformers 5 releases renamed forward's `past_key_values` to `cache` (5.24
        # warns on the old name, which goes in 5.40); older ones know only the old name.
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.tokenizer, self.model = tokenizer, model

    def batch_key(self, job_input: dict[str, Any]) -> None:
        return None  # sampling settings are per row: any two text jobs can share a batch

    def predict(self, jobs: list[JobContext]) -> list[Result]:
        results: list[Result | None] = [None] * len(jobs)

        def keep(index: int, result: Result) -> None:
            results[index] = result

        self.predict_each(jobs, keep)
        return [r if r is not None else RuntimeError("job was not run") for r in results]

    def predict_each(
        self, jobs: list[JobContext], deliver: Deliver, admit: Admit | None = None
    ) -> None:
        """Each job's result goes to `deliver` as its row ends: a short text is not held
        until the longest text of its batch is done. With `admit`, jobs arriving while
        the batch runs join it between two decode steps, up to max_batch_size rows: a
        job does not wait for a running batch to end either."""
        if self.model is None:
            raise RuntimeError("LLMBackend.predict called before setup()")
        rows = self._rows(enumerate(jobs), deliver)
        with self._lock, torch.inference_mode():
            self._decode_fitting(rows, deliver, admit)
        for row in rows:  # whatever the loop did not hand over (it failed midway)
            if not row.delivered:
                _hand_over(row, deliver)

    def _decode_fitting(self, rows: list[_Row], deliver: Deliver, admit: Admit | None) -> None:
        """Decode `rows`; when the device runs out of memory, the rows still running go
        on in two halves, one after the other, each from the tokens it has (its stream,
        progress and generator carry on where they were: nothing is sent twice, and
        the text is the one it would have been). Later batches are capped at the half
        that fits. A row that does not fit alone fails with out_of_memory."""
        oom: str | None = None
        try:
            self._decode(rows, deliver, admit)
        except torch.OutOfMemoryError as exc:
            oom = hf.first_line(exc)  # its traceback holds the loop's tensors: let go first
        except Exception as exc:  # rows still running fail with it
            for row in rows:
                if row.result is None:
                    row.result = exc
        if oom is None:
            return
        # A step may have grown some layers' cache and not others: that loop cannot go on.
        running = [row for row in rows if row.result is None]
        hf.free_device_memory(self.device, self.spec, oom)
        if len(running) <= 1:
            for row in running:
                row.result = OutOfMemory(
                    f"model {self.spec.name} ran out of device memory decoding one row of "
                    f"{len(row.prompt_ids) + len(row.ids)} tokens: {oom}"
                )
            return
        half = len(running) - len(running) // 2
        if self.caps.lower(half):
            hf.log.warning(
                "model %s: batches of at most %d rows for %.0f s",
                self.spec.name,
                half,
                self.caps.ttl_s,
            )
        for part in (running[:half], running[half:]):
            self._decode_fitting(part, deliver, None)

    # --- inputs -------------------------------------------------------------------
    def _rows(self, jobs: Iterable[tuple[int, JobContext]], deliver: Deliver) -> list[_Row]:
        """A row per (index, job); a job whose input is invalid fails at once, alone."""
        rows = []
        for index, ctx in jobs:
            try:
                rows.append(self._row(index, ctx))
            except hf.InvalidInput as exc:
                deliver(index, exc)
        return rows

    def _row(self, index: int, ctx: JobContext) -> _Row:
        data, d = ctx.input, self.spec.defaults
        prompt_ids = self._prompt_ids(data)
        max_new = hf.int_input(
            data, "max_tokens", d.get("max_tokens", 256), 1, self.spec.limit("max_tokens")
        )
        if self.context_len and len(prompt_ids) + max_new > self.context_len:
            raise hf.InvalidInput(
                f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_new}) exceeds the "
                f"model's context of {self.context_len} tokens"
            )
        stop = data.get("stop") or []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise hf.InvalidInput("stop must be a string or a list of non-empty strings")
        # A CPU generator on any device: a seed draws the same numbers on a CPU and a GPU,
        # and a GPU step does not launch a kernel per row to draw them.
        generator = torch.Generator("cpu").manual_seed(hf.seed_input(data))
        return _Row(
            index=index,
            ctx=ctx,
            prompt_ids=prompt_ids,
            max_new=max_new,
            # Not in the public API: lets benchmarks and tests fix the length of a run.
            min_new=hf.int_input(data, "min_tokens", 0, 0, max_new),
            temperature=hf.float_input(data, "temperature", d.get("temperature", 1.0), 0.0, 5.0),
            top_p=hf.float_input(data, "top_p", d.get("top_p", 1.0), 0.0, 1.0),
            stop=stop,
            generator=generator,
        )

    def _prompt_ids(self, data: dict[str, Any]) -> list[int]:
        limit = self.spec.limit("max_prompt_chars")
        messages, prompt = data.get("messages"), data.get("prompt")
        if messages is not None:
            if not (
                isinstance(messages, list)
                and messages
                and all(
                    isinstance(m, dict)
                    and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)
                    for m in messages
                )
            ):
                raise hf.InvalidInput("messages must be a list of {role, content} strings")
            if sum(len(m["content"]) for m in messages) > limit:
                raise hf.InvalidInput(f"messages are longer than {limit} characters")
            if not self.tokenizer.chat_template:
                raise hf.InvalidInput(f"model {self.spec.name} has no chat template: send a prompt")
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            # The template writes its own special tokens (e.g. BOS).
            return list(self.tokenizer(text, add_special_tokens=False).input_ids)
        if not isinstance(prompt, str) or not prompt:
            raise hf.InvalidInput("prompt (a non-empty string) or messages is required")
        if len(prompt) > limit:
            raise hf.InvalidInput(f"prompt is longer than {limit} characters")
        return list(self.tokenizer(prompt).input_ids)

    # --- the decode loop ----------------------------------------------------------
    def _decode(self, rows: list[_Row], deliver: Deliver, admit: Admit | None = None) -> None:
        """Decode `rows` together until each is done. With `admit`, jobs that arrive
        meanwhile join the running loop between two steps (`rows` gets them too)."""
        if not self._plain_cache:
            admit = None  # joining merges the cache's tensors: plain layers only
        active = self._runnable(rows, deliver)
        if not active:
            return
        cache, mask, last, logits = self._prefill(active)
        while True:
            active, mask, last = self._take_tokens(logits, active, cache, mask, last, deliver)
            if not active:
                return
            if admit is not None:
                joined = self._join(admit, len(active), rows, deliver)
                if joined is not None:
                    mask, last = _merge(cache, mask, last, *joined[1:])
                    active += joined[0]
            step_ids = torch.tensor([[row.ids[-1]] for row in active], device=self.device)
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=-1)
            last = last + 1
            logits = self._forward(step_ids, mask, last[:, None], cache)

    def _take_tokens(
        self,
        logits: torch.Tensor,
        active: list[_Row],
        cache: Any,
        mask: torch.Tensor,
        last: torch.Tensor,
        deliver: Deliver,
    ) -> tuple[list[_Row], torch.Tensor, torch.Tensor]:
        """Every row takes its next token; a finished row is handed over (its job ends
        while the others go on) and leaves the cache. Returns the rows still running with
        their mask and last positions (the cache is changed in place)."""
        next_ids = self._sample(logits, active)
        keep = []
        for i, row in enumerate(active):
            if self._accept(row, next_ids[i]):
                _hand_over(row, deliver)
            else:
                keep.append(i)
        if keep and len(keep) < len(active):
            kept = torch.tensor(keep, device=self.device)
            cache.reorder_cache(kept)
            mask, last = mask[kept], last[kept]
            if self._plain_cache:  # a sliding-window layer keeps its own length
                mask = _trim(cache, mask)
        return [active[i] for i in keep], mask, last

    def _runnable(self, rows: list[_Row], deliver: Deliver) -> list[_Row]:
        """The rows to decode; one stopped already (canceled, timed out) is handed over."""
        active = []
        for row in rows:
            if self._stopped(row):
                _hand_over(row, deliver)
            else:
                active.append(row)
        return active

    def _prefill(self, active: list[_Row]) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the prompts, each with the tokens its row has taken already (a row that
        goes on after running out of memory): (cache, attention mask, each row's last
        position, logits)."""
        from transformers import DynamicCache

        contexts = [row.prompt_ids + row.ids for row in active]
        width = max(len(c) for c in contexts)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(active), width), pad, dtype=torch.long)
        mask = torch.zeros((len(active), width), dtype=torch.long)
        for i, context in enumerate(contexts):  # left padding: every last token is aligned
            ids[i, width - len(context) :] = torch.tensor(context)
            mask[i, width - len(context) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        # Positions count real tokens only, so a padded row sees what it would see alone.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache: Any = DynamicCache(config=self.model.config)
        logits = self._forward(ids, mask, positions, cache)
        return cache, mask, positions[:, -1], logits

    def _join(
        self, admit: Admit, running: int, rows: list[_Row], deliver: Deliver
    ) -> tuple[list[_Row], Any, torch.Tensor, torch.Tensor] | None:
        """Jobs that arrived while the loop ran, prefilled and given their first token:
        (their rows still running, their cache, mask and last positions), or None."""
        fresh = self._rows(admit(running), deliver)
        rows += fresh
        active = self._runnable(fresh, deliver)
        if not active:
            return None
        cache, mask, last, logits = self._prefill(active)
        active, mask, last = self._take_tokens(logits, active, cache, mask, last, deliver)
        return (active, cache, mask, last) if active else None

    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any
    ) -> torch.Tensor:
        metrics.MODEL_STEPS.labels(self.spec.name).inc()
        metrics.MODEL_STEP_ROWS.labels(self.spec.name).inc(ids.shape[0])
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self._cache_arg: cache},
            logits_to_keep=1,
        )
        return out.logits[:, -1, :].float()

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        """One token per row: greedy at temperature 0, else sampled with the row's generator.

        What a row gets depends only on its own logits, settings and generator, never on
        which rows share its batch. A step runs this once: where every row samples (the
        defaults) and alike (all top-p or none), it takes no row subsets, each of which is
        a small tensor built from a list and an indexing (a launch each on a GPU).
        """
        device = logits.device
        early = [i for i, row in enumerate(rows) if len(row.ids) < row.min_new]
        if early:  # min_tokens not reached yet: end-of-sequence is not an option
            rows_index = torch.tensor(early, device=device)[:, None]
            logits[rows_index, self._eos_index[None, :]] = float("-inf")
        sampled = [i for i, row in enumerate(rows) if row.temperature > 0]
        if not sampled:
            return [int(x) for x in logits.argmax(dim=-1).tolist()]
        every = len(sampled) == len(rows)
        chosen = logits if every else logits[torch.tensor(sampled, device=device)]
        temps = torch.tensor([rows[i].temperature for i in sampled], device=device)
        probs = torch.softmax(chosen / temps[:, None], dim=-1)
        whole = [j for j, i in enumerate(sampled) if rows[i].top_p >= 1.0]
        nucleus = [j for j, i in enumerate(sampled) if rows[i].top_p < 1.0]
        # (rows of `probs` or None for all of them, their cdf, their sorted token ids)
        cdfs: list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]] = []
        if whole:  # no truncation: sample the distribution as it is, no sort needed
            sel = None if not nucleus else torch.tensor(whole, device=device)
            cdfs.append((sel, (probs if sel is None else probs[sel]).cumsum(dim=-1), None))
        if nucleus:
            sel = None if not whole else torch.tensor(nucleus, device=device)
            top_p = torch.tensor([rows[sampled[j]].top_p for j in nucleus], device=device)
            part = probs if sel is None else probs[sel]
            head, order = part.sort(dim=-1, descending=True, stable=True)
            # Keep the smallest head whose mass reaches top_p (the first token always stays).
            head = head.masked_fill(head.cumsum(-1) - head > top_p[:, None], 0.0)
            cdfs.append((sel, head.cumsum(dim=-1), order))
        # The draws come after the big allocations: if one runs out of device memory, no
        # generator has moved, and the rows going on in halves draw what they would alone.
        draws = torch.stack([torch.rand((), generator=rows[i].generator) for i in sampled])
        draws = draws.to(device)
        picks = None
        for sel, cdf, sorted_ids in cdfs:
            index = _inverse_cdf(cdf, draws if sel is None else draws[sel])
            if sorted_ids is not None:  # an index into the sorted head: back to token ids
                index = sorted_ids.gather(-1, index[:, None]).squeeze(-1)
            if sel is None:  # one group: all the sampled rows, in order
                picks = index
            else:
                if picks is None:
                    picks = torch.empty(len(sampled), dtype=torch.long, device=device)
                picks[sel] = index
        assert picks is not None
        if every:
            return [int(x) for x in picks.tolist()]
        choice = logits.argmax(dim=-1)
        choice[torch.tensor(sampled, device=device)] = picks
        return [int(x) for x in choice.tolist()]

    def _stopped(self, row: _Row) -> bool:
        if (stop := hf.stop_reason(row.ctx)) is not None:
            row.result = stop
            return True
        return False

    def _accept(self, row: _Row, token: int) -> bool:
        """Take one token for a row; True when the row is finished (or failed)."""
        try:
            return self._advance(row, token)
        except Exception as exc:  # this job's context failed; the batch goes on
            row.result = exc
            return True

    def _advance(self, row: _Row, token: int) -> bool:
        if self._stopped(row):
            return True
        row.ids.append(token)
        if token in self.eos_ids:
            row.finish = "stop"
        else:
            row.text += self._detokenize(row)
            hit = min((p for s in row.stop if (p := row.text.find(s)) >= 0), default=-1)
            if hit >= 0:
                row.text, row.finish = row.text[:hit], "stop"
            elif len(row.ids) >= row.max_new:
                row.finish = "length"
        # Hold back a tail that may be the start of a stop string until it is decided.
        ready = len(row.text) if row.finish else len(row.text) - _held_back(row.text, row.stop)
        if ready > row.sent:
            row.ctx.token(row.text[row.sent : ready])
            row.sent = ready
        row.ctx.progress(len(row.ids), row.max_new)
        if row.finish is None:
            return False
        row.result = {
            "text": row.text,
            "finish_reason": row.finish,
            "usage": {"prompt_tokens": len(row.prompt_ids), "completion_tokens": len(row.ids)},
        }
        return True

    def _detokenize(self, row: _Row) -> str:
        """The text the newest token adds; empty while it ends inside a multi-byte character."""
        decode = self.tokenizer.decode
        before = decode(row.ids[row.prefix_offset : row.read_offset], skip_special_tokens=True)
        after = decode(row.ids[row.prefix_offset :], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            row.prefix_offset, row.read_offset = row.read_offset, len(row.ids)
            # PostgreSQL's jsonb cannot hold U+0000 (the output would never be stored):
            # byte 0 becomes U+FFFD, as any byte that does not decode does.
            return after[len(before) :].replace("\x00", "\ufffd")
        return ""


def _inverse_cdf(cdf: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """Per row, the index where the (unnormalized) cumulative mass passes draw * total."""
    index = torch.searchsorted(cdf, (draws * cdf[:, -1])[:, None], right=True).squeeze(-1)
    return index.clamp(max=cdf.shape[-1] - 1)


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
