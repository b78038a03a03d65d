"""Refinery checkpoints inside lm-evaluation-harness: an ``lm_eval.api.model.LM`` over
:class:`evaluation.model.EvalModel`, registered as model type ``refinery``.

    import evaluation.lm_eval_adapter, lm_eval
    from lm_eval.tasks import TaskManager
    lm_eval.simple_evaluate(model="refinery", model_args="pretrained=runs/RUN/sft/hf,batch_size=16",
                            tasks=["my_task"], task_manager=TaskManager(include_path="my_tasks/"))

Any lm-eval task with local data files works (no hub access here: ``dataset_path: json`` +
``dataset_kwargs.data_files``). Generation is greedy; a request asking for sampling is an error.
"""

from __future__ import annotations

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

from evaluation.model import EvalModel
from training.models import PRECISION_DTYPES


@register_model("refinery")
class RefineryLM(LM):
    """lm-eval's three request types answered by an EvalModel."""

    def __init__(
        self,
        pretrained: str | None = None,
        model: EvalModel | None = None,
        batch_size: int | str = 16,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        dtype: str = "float32",  # lm-eval's model_args name
        generation_backend: str = "auto",
        **_ignored,
    ) -> None:
        super().__init__()
        if model is None:
            if pretrained is None:
                raise ValueError("RefineryLM needs pretrained=<HF dir or 'smollm2'> or model=EvalModel")
            model = EvalModel(pretrained, batch_size=int(batch_size) if str(batch_size).isdigit() else 16,
                              max_length=int(max_length) if max_length else None,
                              precision={v: k for k, v in PRECISION_DTYPES.items()}[dtype],
                              generation_backend=generation_backend)
        self.model = model
        self.max_gen_toks = int(max_gen_toks)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self.model.loglikelihood([req.args for req in requests], progress=not disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        scored = self.model.loglikelihood_rolling([req.args[0] for req in requests], progress=not disable_tqdm)
        return [lp for lp, _ in scored]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests grouped by their generation kwargs (stop sequences, token budget), each group batched."""
        eos = self.model.tokenizer.decode([self.model.eos_token_id])
        groups: dict[tuple[tuple[str, ...], int], list[int]] = {}  # (stop sequences, token budget) → requests
        for i, req in enumerate(requests):
            kwargs = normalize_gen_kwargs(dict(req.args[1]), self.max_gen_toks)
            if kwargs.get("do_sample") and kwargs.get("temperature", 0.0) > 0:
                raise ValueError("RefineryLM generates greedily; this task asks for sampling (do_sample with temperature > 0)")
            until = handle_stop_sequences(kwargs.get("until"), eos=eos)
            key = (tuple(until), int(kwargs["max_gen_toks"]))
            groups.setdefault(key, []).append(i)
        out: list[str] = [""] * len(requests)
        for (until, max_new), idx in groups.items():
            texts = self.model.generate_until([requests[i].args[0] for i in idx], until, max_new, progress=not disable_tqdm)
            for i, text in zip(idx, texts):
                out[i] = text
        return out

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.model.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    @property
    def tokenizer_name(self) -> str:
        return str(self.model.path).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.model.tokenizer, "chat_template", None) or ""
