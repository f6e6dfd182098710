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
    EngineOptions,
    GenerateJob,
    ModelSampler,
    Sample,
    SampledCompletion,
    SamplingEngine,
    ServedModel,
    VllmEngine,
    build_engine,
    find_served_model,
    generate_samples,
    open_sampler,
    run_generate,
)
from dpokit.generation.sampler import (
    DEFAULT_BATCH_SIZE,
    END_OF_TURN_TOKENS,
    Completion,
    SamplingConfig,
    completion_logps,
    decode_completions,
    encode_prompts,
    format_prompt,
    generate,
    policy_and_reference_samples,
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
    "EngineOptions",
    "GenerateJob",
    "ModelSampler",
    "Sample",
    "SampledCompletion",
    "SamplingConfig",
    "SamplingEngine",
    "ServedModel",
    "VllmEngine",
    "build_engine",
    "completion_logps",
    "decode_completions",
    "encode_prompts",
    "find_served_model",
    "format_prompt",
    "generate",
    "generate_samples",
    "open_sampler",
    "policy_and_reference_samples",
    "run_generate",
    "sample_completions",
    "sample_with_kl",
    "stop_token_ids",
]
