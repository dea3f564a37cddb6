"""The two sides being compared: a trtbuild engine and the Hugging Face model it was built from.

Both take the same token ids and give logits as float32 numpy arrays and generated token ids, so
perplexity and ROUGE are computed by one piece of code for both. Only `HFSide` imports torch and
transformers, and only when it is made.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from trtbuild.errors import TrtbuildError
from trtbuild.runtime.sampling import SamplingConfig

log = logging.getLogger(__name__)

HF_DTYPES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
             "bf16": "bfloat16", "bfloat16": "bfloat16"}


def load_text_tokenizer(tokenizer_dir: str | Path):
    """A `tokenizers.Tokenizer` from tokenizer.json in `tokenizer_dir` (or, failing that, what
    transformers' AutoTokenizer makes of the dir), with truncation and padding switched off so that
    long texts are tokenized whole."""
    d = Path(tokenizer_dir)
    if (d / "tokenizer.json").is_file():
        from trtbuild.tokenizer import load_tokenizer

        tok = load_tokenizer(d)
    elif d.is_dir():
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(d)).backend_tokenizer
        except Exception as e:  # noqa: BLE001 - any failure means: no usable tokenizer here
            raise TrtbuildError(f"{d} has no tokenizer.json and transformers could not load a fast tokenizer "
                                f"from it ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                                "pass --tokenizer_dir") from None
    else:
        raise TrtbuildError(f"tokenizer dir {d} not found; pass --tokenizer_dir")
    if tok.truncation is not None:
        tok.no_truncation()
    if tok.padding is not None:
        tok.no_padding()
    return tok


class EngineSide:
    """A trtbuild engine through ModelRunner (no torch)."""

    name = "engine"

    def __init__(self, runner):
        self.runner = runner

    @classmethod
    def from_dir(cls, engine_dir: str | Path, num_threads: int | None = None,
                 tokenizer_dir: str | Path | None = None, **runner_options) -> "EngineSide":
        from trtbuild.runtime import ModelRunner

        if not Path(engine_dir).is_dir():
            raise TrtbuildError(f"--engine_dir {engine_dir} not found; build one with trt-build")
        return cls(ModelRunner.from_dir(engine_dir, num_threads=num_threads, tokenizer_dir=tokenizer_dir,
                                        **runner_options))

    @property
    def max_batch_size(self) -> int:
        return self.runner.config.build_config.max_batch_size

    @property
    def max_input_len(self) -> int:
        return self.runner.config.build_config.max_input_len

    @property
    def max_seq_len(self) -> int:
        return self.runner.config.build_config.max_seq_len

    @property
    def eos_token_id(self) -> int | None:
        eos = self.runner.config.pretrained_config.eos_token_id
        return eos[0] if isinstance(eos, list) else eos

    def logits(self, batch: list[list[int]], lora_task_ids: list[int] | None = None) -> np.ndarray:
        """Logits at every position, [B, S, vocab] float32, rows right-padded."""
        return self.runner.score(batch, lora_task_ids=lora_task_ids)

    def generate(self, batch: list[list[int]], sampling: SamplingConfig,
                 lora_task_ids: list[int] | None = None) -> list[list[int]]:
        """New tokens of each prompt (end id excluded)."""
        return self.runner.generate(batch, sampling, lora_task_ids=lora_task_ids).output_ids


class HFSide:
    """The transformers model, fed the same token ids as the engine."""

    name = "hf"
    max_batch_size = None
    max_input_len = None
    max_seq_len = None

    def __init__(self, model_dir: str | Path, data_type: str = "fp32", num_threads: int | None = None,
                 lora_dir: str | Path | None = None):
        import torch
        import transformers

        if data_type not in HF_DTYPES:
            raise TrtbuildError(f"--data_type {data_type!r} is not one of fp32, fp16, bf16")
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise TrtbuildError(f"--hf_model_dir {model_dir} is not a Hugging Face model dir (no config.json)")
        if num_threads:
            torch.set_num_threads(num_threads)
        self.torch = torch
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(model_dir), dtype=getattr(torch, HF_DTYPES[data_type]))
        except (OSError, ValueError, KeyError) as e:
            raise TrtbuildError(f"transformers could not load --hf_model_dir {model_dir}: "
                                f"{str(e).splitlines()[0]}") from None
        if lora_dir is not None:
            model = self._apply_lora(model, Path(lora_dir))
        self.model = model.eval()
        self.model_dir = model_dir
        gen = getattr(self.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        if eos is None:
            eos = getattr(self.model.config, "eos_token_id", None)
        self.eos_token_id = eos[0] if isinstance(eos, list) else eos

    @staticmethod
    def _apply_lora(model, lora_dir: Path):
        try:
            from peft import PeftModel
        except ImportError:
            raise TrtbuildError("the transformers side needs peft to apply --lora_dir: "
                                "pip install 'trtbuild[convert]'") from None
        if not lora_dir.is_dir():
            raise TrtbuildError(f"--lora_dir {lora_dir} not found")
        try:
            return PeftModel.from_pretrained(model, str(lora_dir)).merge_and_unload()
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise TrtbuildError(f"peft could not apply --lora_dir {lora_dir}: {str(e).splitlines()[0]}") from None

    def logits(self, batch: list[list[int]], lora_task_ids: list[int] | None = None) -> np.ndarray:
        torch = self.torch
        seq = max(len(p) for p in batch)
        ids = torch.zeros((len(batch), seq), dtype=torch.long)
        mask = torch.zeros((len(batch), seq), dtype=torch.long)
        for b, p in enumerate(batch):
            ids[b, :len(p)] = torch.tensor(p)
            mask[b, :len(p)] = 1
        with torch.no_grad():
            out = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return out.float().numpy()

    def generate(self, batch: list[list[int]], sampling: SamplingConfig,
                 lora_task_ids: list[int] | None = None) -> list[list[int]]:
        """Left-padded batch through model.generate; new tokens cut at the end id."""
        torch = self.torch
        sampling.validate()
        pad = sampling.pad_id if sampling.pad_id is not None else (sampling.end_id or 0)
        seq = max(len(p) for p in batch)
        ids = torch.full((len(batch), seq), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), seq), dtype=torch.long)
        for b, p in enumerate(batch):
            ids[b, seq - len(p):] = torch.tensor(p)
            mask[b, seq - len(p):] = 1
        kwargs = dict(max_new_tokens=sampling.max_new_tokens, pad_token_id=pad,
                      eos_token_id=sampling.end_id, num_beams=1)
        if sampling.greedy:
            kwargs.update(do_sample=False, top_k=None, top_p=None, temperature=None)
        else:
            if sampling.random_seed is not None:
                torch.manual_seed(sampling.random_seed)
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_k=sampling.top_k or None,
                          top_p=sampling.top_p if 0.0 < sampling.top_p < 1.0 else None)
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        results = []
        for row in out[:, seq:].tolist():
            if sampling.end_id is not None and sampling.end_id in row:
                row = row[:row.index(sampling.end_id)]
            results.append(row)
        return results
