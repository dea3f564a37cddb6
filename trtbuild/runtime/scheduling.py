"""How an engine's in-flight batches run: KV cache reuse, chunked prefill and speculative decoding
(SchedulerConfig, read by trtbuild.runtime.scheduler), from the engine's build defaults and the
options a caller gives (run.py, summarize.py, trtbuild-serve and the Triton model all use
`scheduling_config`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from trtbuild.errors import TrtbuildError
from trtbuild.runtime.speculation import SpeculativeConfig

if TYPE_CHECKING:
    from trtbuild.runtime.model_runner import ModelRunner

log = logging.getLogger(__name__)


@dataclass
class SchedulerConfig:
    """TensorRT-LLM's executor names where it has them."""

    kv_cache_reuse: bool = True  # enable_kv_cache_reuse
    max_num_tokens: int | None = None  # prompt tokens a step feeds while others decode (None: the engine's)
    speculation: SpeculativeConfig | None = None


def scheduling_config(runner: "ModelRunner", *, kv_cache_reuse: bool = True, max_num_tokens: int | None = None,
                      speculative_decoding_mode: str | None = None, max_draft_len: int | None = None,
                      max_matching_ngram_size: int = 3, min_matching_ngram_size: int = 2,
                      draft_engine_dir: str | Path | None = None, speculative_max_batch_size: int = 1,
                      num_threads: int | None = None) -> SchedulerConfig:
    """The SchedulerConfig of `runner`: speculation as the engine was built for
    (build_config.speculative_decoding_mode) unless speculative_decoding_mode says otherwise
    ("none": off); a draft_engine_dir alone means draft_tokens_external. Errors are one line."""
    bc = runner.config.build_config
    mode = speculative_decoding_mode
    if mode is None:
        mode = "draft_tokens_external" if draft_engine_dir else bc.speculative_decoding_mode
        if mode == "draft_tokens_external" and not draft_engine_dir:
            log.info("%s was built for a draft engine; none given (--draft_engine_dir): no speculation",
                     runner.engine_dir)
            mode = None
    if max_num_tokens is not None and max_num_tokens < 1:
        raise TrtbuildError(f"max_num_tokens {max_num_tokens} must be at least 1")
    config = SchedulerConfig(kv_cache_reuse=kv_cache_reuse, max_num_tokens=max_num_tokens)
    if mode in (None, "none"):
        if draft_engine_dir:
            raise TrtbuildError(f"a draft engine ({draft_engine_dir}) is given with speculative_decoding_mode "
                                f"{mode}: use draft_tokens_external")
        return config
    draft = None
    if mode == "draft_tokens_external" and draft_engine_dir:  # opened as the target was
        draft = type(runner).from_dir(draft_engine_dir, num_threads=num_threads, spinning=False)
    elif draft_engine_dir:
        raise TrtbuildError(f"a draft engine ({draft_engine_dir}) is given with speculative_decoding_mode {mode}: "
                            "use draft_tokens_external")
    config.speculation = SpeculativeConfig(mode, max_draft_len or bc.max_draft_len or SpeculativeConfig.max_draft_len,
                                           max_matching_ngram_size, speculative_max_batch_size, draft,
                                           min_matching_ngram_size)
    config.speculation.validate(runner)
    return config
