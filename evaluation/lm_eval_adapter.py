"""lm-eval model `partinfer`: our runtime, with every method and its options as model args.

    lm_eval --model partinfer --model_args method=partinfer,gamma=0.7,phi=0.4 --tasks ...

Scoring (`loglikelihood`): the context is the sentence — ε is selected from the context's prefill —
and the continuation is scored with the decode-time neurons, as generation would compute it
(`evaluation.perplexity.continuation_logprobs`). `loglikelihood_rolling` scores lm-eval's rolling
windows the same way, each window's context being its sentence. `generate_until` runs the runtime's
`generate()` on the raw context (no chat template) and cuts at the first stop string.
Requests run one at a time: every sequence needs its own selection anyway.
"""

from __future__ import annotations

from pathlib import Path

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from evaluation.perplexity import continuation_logprobs
from runtime.defaults import shipped_model_neurons
from runtime.engine import load_engine
from runtime.generate import SamplingConfig, generate
from runtime.sparsity import SparsityConfig
from runtime.text import TextStream


def _opt_int(value) -> int | None:
    return None if value in (None, "", "None") else int(value)


@register_model("partinfer")
class PartinferLM(LM):
    def __init__(
        self, model: str | None = None, method: str = "partinfer", gamma: float = 0.7, delta: float = 0.3,
        phi: float = 0.4, token_sparsity: float = 0.2, core_score: str = "abs", start_num=None, end_num=None,
        model_neurons: str | None = None, dataset_neurons: str | None = None, base_neurons_type: str = "model",
        dtype: str = "bf16", device: str = "cpu", max_length: int = 2048, batch_size: int = 1, **_unused,
    ):
        super().__init__()
        neurons = Path(model_neurons) if model_neurons else shipped_model_neurons(model)
        sparsity = SparsityConfig(
            method=method, gamma=float(gamma), delta=float(delta), phi=float(phi),
            token_sparsity=float(token_sparsity), core_score=core_score, start_num=_opt_int(start_num),
            end_num=_opt_int(end_num), base_neurons_type=base_neurons_type, model_neurons=neurons,
            dataset_neurons=Path(dataset_neurons) if dataset_neurons else None,
        )
        self.engine = load_engine(model, dtype, device, sparsity)
        self.tokenizer = self.engine.tokenizer
        self.max_length = min(int(max_length), self.engine.model.cfg.max_seq_len)
        self.prefix_token = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0

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

    def _score(self, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
        logprobs, greedy = continuation_logprobs(self.engine.model, ctx, cont)
        return float(logprobs.sum()), bool(greedy.all())

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = []
        for request in tqdm(requests, desc="loglikelihood", disable=disable_tqdm):
            out.append(self._score(*self._context_and_continuation(*request.args)))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for request in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm):
            (text,) = request.args
            windows = get_rolling_token_windows(
                token_list=self._encode(text), prefix_token=self.prefix_token, max_seq_len=self.max_length,
                context_len=1,
            )
            out.append(sum(self._score(*make_disjoint_window(w))[0] for w in windows))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        model = self.engine.model
        for request in tqdm(requests, desc="generate_until", disable=disable_tqdm):
            context, kwargs = request.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 256))
            sampling = SamplingConfig(temperature=float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0)
            ids = self._encode(context)[-(self.max_length - max_new) :] or [self.prefix_token]
            stream = TextStream(self.tokenizer, self.engine.stop_ids)
            text = [""]

            def stop_at_until(tokens) -> bool:
                text[0] += stream.push(int(tokens[0]))
                return any(u in text[0] for u in until)

            generate(model, [ids], max_new, sampling, self.engine.stop_ids, on_token=stop_at_until)
            answer = text[0]
            for u in until:
                answer = answer.split(u)[0]
            out.append(answer)
        return out
