"""Generation: the one place dpokit produces completions.

* :mod:`dpokit.generation.sampler` -- dpokit's batched KV-cache generator (:func:`generate`), teacher-forced
  log-probs (:func:`completion_logps`), prompt formatting (:func:`format_prompt`, :func:`encode_prompts`)
  and ``dpokit generate``;
* :mod:`dpokit.generation.engines` -- the one sampling interface (:class:`SamplingEngine`) with its two
  engines: dpokit's generator in this process, and a vLLM server reached by URL.

Everything is importable from ``dpokit.generation`` directly.
"""

from dpokit.generation.engines import (
    ENGINES,
    DpokitEngine,
    EngineError,
    SampledCompletion,
    SamplingEngine,
    VllmEngine,
    build_engine,
)
from dpokit.generation.sampler import (
    DEFAULT_BATCH_SIZE,
    END_OF_TURN_TOKENS,
    Completion,
    GenerateJob,
    Sample,
    SamplingConfig,
    completion_logps,
    decode_completions,
    encode_prompts,
    format_prompt,
    generate,
    generate_samples,
    policy_and_reference_samples,
    run_generate,
    sample_completions,
    sample_with_kl,
    stop_token_ids,
)

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "END_OF_TURN_TOKENS",
    "ENGINES",
    "Completion",
    "DpokitEngine",
    "EngineError",
    "GenerateJob",
    "Sample",
    "SampledCompletion",
    "SamplingConfig",
    "SamplingEngine",
    "VllmEngine",
    "build_engine",
    "completion_logps",
    "decode_completions",
    "encode_prompts",
    "format_prompt",
    "generate",
    "generate_samples",
    "policy_and_reference_samples",
    "run_generate",
    "sample_completions",
    "sample_with_kl",
    "stop_token_ids",
]
