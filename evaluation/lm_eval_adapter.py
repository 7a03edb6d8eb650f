"""lm-eval model `partinfer`: our runtime, with every method and its options as model args.

    lm_eval --model partinfer --model_args method=partinfer,gamma=0.7,phi=0.4 --tasks ...

Scoring (`loglikelihood`): the context is the sentence — ε is selected from the context's prefill —
and the continuation is scored with the decode-time neurons, as generation would compute it
(`evaluation.scoring`); the choices of one question share the context's prefill and are scored as
one batch. `loglikelihood_rolling` (perplexity tasks) treats the first `prompt_tokens` tokens of a
text as its sentence and the rest as decode. `generate_until` runs the runtime's `generate()` on the
raw context (no chat template), `batch_size` requests at a time, and cuts at the first stop string.
"""

from __future__ import annotations

from dataclasses import fields

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from partinfer.evaluation.scoring import score_continuations
from partinfer.runtime.defaults import shipped_model_neurons
from partinfer.runtime.engine import load_engine
from partinfer.runtime.generate import SamplingConfig, generate
from partinfer.runtime.sparsity import SparsityConfig
from partinfer.runtime.text import TextStream


@register_model("partinfer")
class PartinferLM(LM):
    def __init__(
        self, model: str | None = None, sparsity: SparsityConfig | None = None, dtype: str = "bf16",
        device: str = "cpu", max_length: int = 2048, batch_size: int | str = 1, score_batch: int = 16,
        prompt_tokens: int = 64, weights: str | None = None, **settings,
    ):
        """`sparsity` from our runner, or its fields as strings from lm-eval's `--model_args`
        (e.g. `method=partinfer,gamma=0.7,weights=q4`); lm-eval's own extra arguments are ignored."""
        super().__init__()
        if sparsity is None:
            known = {f.name for f in fields(SparsityConfig)}
            values = {k: v for k, v in settings.items() if k in known}
            if not values.get("model_neurons"):
                values["model_neurons"] = shipped_model_neurons(model)
            sparsity = SparsityConfig.from_dict(values)
        self.engine = load_engine(model, dtype, device, sparsity, weights or None)
        self.tokenizer = self.engine.tokenizer
        self.max_length = min(int(max_length), self.engine.model.cfg.max_seq_len)
        self.prefix_token = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        # generate_until sequences per batch; on a CPU 1 is fastest (the compiled one-token decode)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 1
        self.score_batch = int(score_batch)  # continuations of one context scored together
        self.prompt_tokens = int(prompt_tokens)  # loglikelihood_rolling: a window's sentence

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _context_and_continuation(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids split as lm-eval's HF model does: encode the whole, the continuation is what follows."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self._encode(context + continuation)
        ctx = self._encode(context)
        cont = whole[len(ctx) :] or self._encode(continuation)
        ctx = ctx or [self.prefix_token]
        return ctx[-(self.max_length - len(cont)) :], cont[-self.max_length + 1 :]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """Requests that share a context (the choices of one question) share its prefill and selection."""
        groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for i, request in enumerate(requests):
            ctx, cont = self._context_and_continuation(*request.args)
            groups.setdefault(tuple(ctx), []).append((i, cont))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        with tqdm(total=len(requests), desc="loglikelihood", disable=disable_tqdm) as bar:
            for ctx, members in groups.items():
                for start in range(0, len(members), self.score_batch):
                    chunk = members[start : start + self.score_batch]
                    scored, _ = score_continuations(self.engine.model, list(ctx), [c for _, c in chunk])
                    for (i, _), (logprobs, greedy) in zip(chunk, scored):
                        out[i] = (float(logprobs.sum()), bool(greedy.all()))
                    bar.update(len(chunk))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts. Each window's first `prompt_tokens` tokens are its sentence
        (scored by the prefill that computes them, with every loaded neuron, and used for selection);
        the rest of the window is scored with the decode-time neurons."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for request in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm):
            (text,) = request.args
            total = 0.0
            for window in get_rolling_token_windows(
                token_list=self._encode(text), prefix_token=self.prefix_token, max_seq_len=self.max_length,
                context_len=1,
            ):
                ctx, cont = make_disjoint_window(window)
                head = max(0, min(self.prompt_tokens, len(cont) - 1))
                scored, ctx_logprobs = score_continuations(
                    self.engine.model, ctx + cont[:head], [cont[head:]], score_context=True)
                total += float(ctx_logprobs[len(ctx) - 1 :].sum()) + float(scored[0][0].sum())
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled) generation on the raw context, batched `batch_size` requests at a time
        (left padding; each sequence selects its own neurons), each cut at its first stop string."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].args[0]))
        out: list[str] = [""] * len(requests)
        with tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm) as bar:
            pending = list(order)
            while pending:
                kwargs = requests[pending[0]].args[1]
                same = [i for i in pending if requests[i].args[1] == kwargs][: self.batch_size]
                pending = [i for i in pending if i not in same]
                for i, text in zip(same, self._generate_batch([requests[i].args[0] for i in same], kwargs)):
                    out[i] = text
                bar.update(len(same))
        return out

    def _generate_batch(self, contexts: list[str], kwargs: dict) -> list[str]:
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kwargs.get("max_gen_toks", 256))
        temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
        prompts = [self._encode(c)[-(self.max_length - max_new) :] or [self.prefix_token] for c in contexts]
        streams = [TextStream(self.tokenizer, self.engine.stop_ids) for _ in contexts]
        texts = [""] * len(contexts)
        finished = [False] * len(contexts)

        def on_token(tokens) -> bool:
            for b, token in enumerate(tokens.tolist()):
                if finished[b]:
                    continue
                if token in self.engine.stop_ids:
                    finished[b] = True
                    continue
                texts[b] += streams[b].push(token)
                finished[b] = any(u in texts[b] for u in until)
            return all(finished)

        generate(self.engine.model, prompts, max_new, SamplingConfig(temperature=temperature), self.engine.stop_ids,
                 on_token=on_token, pad_id=self.prefix_token)
        for u in until:
            texts = [t.split(u)[0] for t in texts]
        return texts
