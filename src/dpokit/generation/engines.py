"""One sampling interface, two engines.

A :class:`SamplingEngine` completes tokenized prompts: ``engine.sample(prompt_ids, sampling)`` returns
``len(prompt_ids) * sampling.num_samples`` :class:`SampledCompletion` s, prompt-major, each with the
token ids that were sampled (ending with the stop token when one ended it), its text, the per-token
log-probs when the engine reports them, and why it finished. Callers build an engine once with
:func:`build_engine` and never ask which one they hold.

* ``dpokit`` (:class:`DpokitEngine`): the batched KV-cache generator of :mod:`dpokit.generation.sampler`
  on the model in this process, seeded per prompt (``seed + i``), so the samples do not depend on the
  batch. It reports no per-token log-probs.
* ``vllm`` (:class:`VllmEngine`): a running vLLM OpenAI-compatible server reached by URL
  (``POST /v1/completions`` with the prompts as token ids, ``return_token_ids`` and ``logprobs``). The
  server runs in its own environment (see docs/vllm.md); per-token log-probs are the ones vLLM reports,
  those of the model's own distribution before temperature and truncation (vLLM's ``raw_logprobs``).
  No per-request seed is sent: the CPU build of vLLM 0.32 dies on one ("CPU Generator does not use
  offset"), so vLLM samples are reproducible only as far as the server's ``--seed`` makes them.

Prompts with images (``sample(..., images=...)``, a vision-language model) are sampled by the dpokit
engine only; the vLLM engine refuses them.

The commands that sample named models (``dpokit generate``, ``dpokit winrate``) take the engine as
:class:`EngineOptions` (``--engine``, ``--engine-url``, ``--api-key-env``) and open each model with
:func:`open_sampler`: with ``dpokit`` the model is loaded here; with ``vllm`` the model must be one the
server serves (:func:`find_served_model`: its served name, or the directory the server loaded it from),
and its tokenizer is read from that directory. :func:`generate_samples` is prompts in, texts out, through
either engine.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from dpokit.data.prompts import Prompt, PromptRow, read_prompt_rows
from dpokit.errors import ConfigError, DpokitError
from dpokit.generation.sampler import (
    DEFAULT_BATCH_SIZE,
    SamplingConfig,
    completion_logps,
    encode_prompts,
    eval_mode,
    generate,
    stop_token_ids,
)
from dpokit.models import LoadOptions, pad_id_of

ENGINES = ("dpokit", "vllm")
DEFAULT_VLLM_KEY_ENV = "VLLM_API_KEY"


class EngineError(DpokitError):
    """The sampling engine failed (a server that cannot be reached or answered with an error)."""


@dataclass(frozen=True)
class EngineOptions:
    """Which engine a command samples with: ``--engine``, ``--engine-url`` and ``--api-key-env`` (the
    meaning of ``online.sampling.engine``, ``.url`` and ``.api_key_env``)."""

    engine: str = "dpokit"
    url: str | None = None
    api_key_env: str = DEFAULT_VLLM_KEY_ENV

    def validate(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"unknown sampling engine {self.engine!r}; choose one of {', '.join(ENGINES)}")
        if self.engine == "vllm" and not self.url:
            raise ConfigError(
                "--engine vllm needs --engine-url, the address of a running vLLM server "
                "(e.g. http://127.0.0.1:8000; docs/vllm.md shows how to start one)"
            )


@dataclass(frozen=True)
class ServedModel:
    """A model a vLLM server serves (an entry of its ``/v1/models``): the ``name`` requests ask for, the
    ``root`` it was loaded from (a directory on the server's machine, or a hub id) and, for a LoRA adapter,
    the ``parent`` base model's name and that model's root (``parent_root``)."""

    name: str
    root: str | None = None
    parent: str | None = None
    parent_root: str | None = None


@dataclass
class SampledCompletion:
    """One completion of prompt ``prompt_index``.

    ``token_ids``: the ids as sampled, ending with the stop token when one ended the completion
    (``finish_reason == "stop"``); ``text``: those ids decoded without the stop token and without
    special tokens; ``token_logprobs``: ``log pi(y_t | x, y_<t)`` of every sampled token under the
    model's own distribution, when the engine reports them (else None).
    """

    prompt_index: int
    sample_index: int
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (a stop token ended it) or "length" (max_new_tokens reached)
    token_logprobs: list[float] | None = None

    @property
    def stopped(self) -> bool:
        return self.finish_reason == "stop"

    @property
    def content_ids(self) -> list[int]:
        """The completion without its stop token."""
        return self.token_ids[:-1] if self.stopped else self.token_ids


class SamplingEngine(Protocol):
    """Anything that completes tokenized prompts (the module docstring says what it returns)."""

    name: str

    def sample(
        self,
        prompt_ids: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        images: Sequence[Sequence[bytes]] | None = None,
    ) -> list[SampledCompletion]: ...


class DpokitEngine:
    """dpokit's own generator on ``model`` (in this process), exactly as :func:`~dpokit.generation.sampler.generate`;
    ``processor``: a vision-language model's processor, whose image processor reads the prompts' images."""

    name = "dpokit"

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = DEFAULT_BATCH_SIZE, processor: Any = None) -> None:
        self.model, self.tokenizer, self.batch_size, self.processor = model, tokenizer, batch_size, processor

    def sample(
        self,
        prompt_ids: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        images: Sequence[Sequence[bytes]] | None = None,
    ) -> list[SampledCompletion]:
        if not prompt_ids:
            return []
        stops, pad = stop_token_ids(self.tokenizer), pad_id_of(self.tokenizer)
        image_processor = getattr(self.processor, "image_processor", None)
        completions = generate(
            self.model,
            prompt_ids,
            sampling,
            stop_token_ids=stops,
            pad_token_id=pad,
            batch_size=self.batch_size,
            images=images if images and any(images) else None,
            image_processor=image_processor,
        )
        texts = self.tokenizer.batch_decode([c.content_ids for c in completions], skip_special_tokens=True)
        return [
            SampledCompletion(c.prompt_index, c.sample_index, list(c.token_ids), text, "stop" if c.stopped else "length")
            for c, text in zip(completions, texts, strict=True)
        ]


class VllmEngine:
    """A vLLM OpenAI-compatible server at ``url`` (``http://HOST:PORT``, with or without ``/v1``).

    ``model``: the served model name (None: the server's first, from ``/v1/models``); ``adapter``, when
    set, is the name of a LoRA adapter loaded into the server, asked for instead of the base model.
    ``tokenizer`` (the policy's): its stop tokens (EOS and a chat template's end-of-turn token) stop
    sampling, and it decodes the texts, exactly as the dpokit engine does -- vLLM's own text holds back
    the bytes of a character that the token limit cut in half.
    """

    name = "vllm"

    def __init__(
        self,
        url: str,
        *,
        model: str | None = None,
        tokenizer: Any = None,
        api_key_env: str = DEFAULT_VLLM_KEY_ENV,
        timeout_s: float = 600.0,
        max_prompts_per_request: int = 256,
        setting: str = "online.sampling.url",
    ) -> None:
        import openai

        self.setting = setting  # the setting that gave the URL, named in errors
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"{setting} must be an http(s) URL of a vLLM server, got {url!r}")
        self.url = url.rstrip("/") if url.rstrip("/").endswith("/v1") else url.rstrip("/") + "/v1"
        key = os.environ.get(api_key_env) or "no-key"
        self.client = openai.OpenAI(base_url=self.url, api_key=key, max_retries=2, timeout=timeout_s)
        self.headers = {"Authorization": f"Bearer {key}"}  # for the server's other endpoints (weight updates)
        self.tokenizer = tokenizer
        self.stop_ids = stop_token_ids(tokenizer) if tokenizer is not None else []
        self.max_prompts_per_request = max(1, max_prompts_per_request)
        self.adapter: str | None = None  # the LoRA adapter holding the current policy, once one is loaded
        self.synced_step: int | None = None  # the policy step whose weights the server has (None: not yet given)
        self._model = model

    @property
    def model(self) -> str:
        """The name asked for: the loaded adapter's, else the served model's."""
        if self.adapter is not None:
            return self.adapter
        if self._model is None:
            served = self.served_models()
            if not served:
                raise EngineError(f"the vLLM server at {self.url} serves no model")
            self._model = served[0].name
        return self._model

    def served_models(self) -> list[ServedModel]:
        """What the server serves (``GET /v1/models``), in its order: base models, then LoRA adapters."""
        listed = self._call(lambda: self.client.models.list()).data
        entries = [(str(m.id), (m.model_extra or {}).get("root"), (m.model_extra or {}).get("parent")) for m in listed]
        roots = {name: root for name, root, _ in entries}
        return [ServedModel(name, root, parent, roots.get(parent) if parent else None) for name, root, parent in entries]

    def _call(self, request: Any) -> Any:
        """``request()``, with the client's failures said as one line naming the server."""
        import openai

        try:
            return request()
        except openai.APIStatusError as error:
            body = error.body if isinstance(error.body, dict) else {}
            message = body.get("message") or (body.get("error") or {}).get("message") or str(error)
            raise EngineError(f"the vLLM server at {self.url} answered HTTP {error.status_code}: {message}") from None
        except openai.APIConnectionError as error:
            raise EngineError(
                f"cannot reach the vLLM server at {self.url} ({error}); start it (docs/vllm.md) or fix {self.setting}"
            ) from None

    def sample(
        self,
        prompt_ids: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        images: Sequence[Sequence[bytes]] | None = None,
    ) -> list[SampledCompletion]:
        if images and any(images):
            raise ConfigError("prompts with images are sampled with the dpokit engine only (--engine dpokit), not vLLM")
        sampling.validate()
        out: list[SampledCompletion] = []
        step = self.max_prompts_per_request
        for start in range(0, len(prompt_ids), step):
            out += self._request(prompt_ids[start : start + step], sampling, first=start)
        return out

    def _request(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig, *, first: int) -> list[SampledCompletion]:
        """One ``/v1/completions`` request for ``prompt_ids`` (prompt numbers from ``first``)."""
        n = sampling.num_samples
        response = self._call(
            lambda: self.client.completions.create(
                model=self.model,
                prompt=[list(map(int, ids)) for ids in prompt_ids],
                n=n,
                max_tokens=sampling.max_new_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                logprobs=0,
                extra_body={
                    "top_k": sampling.top_k if sampling.top_k > 0 else -1,
                    "stop_token_ids": self.stop_ids,
                    "return_token_ids": True,
                    "skip_special_tokens": True,
                },
            )
        )
        if len(response.choices) != len(prompt_ids) * n:
            raise EngineError(f"the vLLM server at {self.url} returned {len(response.choices)} choices for {len(prompt_ids) * n}")
        return [self._completion(choice, first, n) for choice in sorted(response.choices, key=lambda c: c.index)]

    def _completion(self, choice: Any, first: int, n: int) -> SampledCompletion:
        extra = choice.model_extra or {}
        token_ids = extra.get("token_ids")
        if token_ids is None:
            raise EngineError(f"the vLLM server at {self.url} returned no token ids (it needs return_token_ids: vLLM >= 0.10.2)")
        logprobs = choice.logprobs.token_logprobs if choice.logprobs is not None else None
        finish = "stop" if choice.finish_reason == "stop" else "length"
        ids = [int(t) for t in token_ids]
        text = choice.text
        if self.tokenizer is not None:
            text = self.tokenizer.decode(ids[:-1] if finish == "stop" else ids, skip_special_tokens=True)
        logps = None if logprobs is None else [float(x) for x in logprobs]
        return SampledCompletion(first + choice.index // n, choice.index % n, ids, text, finish, logps)


def build_engine(
    engine: str,
    *,
    model: Any = None,
    tokenizer: Any = None,
    url: str | None = None,
    served_model: str | None = None,
    api_key_env: str = DEFAULT_VLLM_KEY_ENV,
    batch_size: int = DEFAULT_BATCH_SIZE,
    processor: Any = None,
) -> SamplingEngine:
    """The engine named ``engine``: ``dpokit`` samples ``model`` here (``processor``: a vision-language model's,
    for prompts with images), ``vllm`` asks the server at ``url``."""
    if engine == "dpokit":
        if model is None or tokenizer is None:
            raise ConfigError("the dpokit sampling engine needs a model and its tokenizer")
        return DpokitEngine(model, tokenizer, batch_size=batch_size, processor=processor)
    if engine == "vllm":
        if not url:
            raise ConfigError(
                "online.sampling.engine=vllm needs online.sampling.url, the address of a running vLLM server "
                "(e.g. http://127.0.0.1:8000; docs/vllm.md shows how to start one)"
            )
        return VllmEngine(url, model=served_model, tokenizer=tokenizer, api_key_env=api_key_env)
    raise ConfigError(f"unknown sampling engine {engine!r}; choose one of {', '.join(ENGINES)}")


def policy_logps(
    model: Any,
    prompt_ids: Sequence[Sequence[int]],
    token_ids: Sequence[Sequence[int]],
    *,
    tokenizer: Any,
    batch_size: int,
    images: Sequence[Sequence[bytes]] | None = None,
    image_processor: Any = None,
) -> list[float]:
    """Teacher-forced ``log pi(y|x)`` of each sampled completion under ``model`` (in eval mode meanwhile);
    ``images``: per completion, its prompt's images (a vision-language model)."""
    if not token_ids:
        return []
    pictured = {"images": images, "image_processor": image_processor} if images and any(images) else {}
    with torch.no_grad(), eval_mode(model):
        pad = pad_id_of(tokenizer)
        logps = completion_logps(model, prompt_ids, token_ids, pad_token_id=pad, batch_size=batch_size, **pictured)
    return [float(x) for x in logps]


def engine_logp_gap(completions: Sequence[SampledCompletion], policy_logps: Sequence[float]) -> float | None:
    """The largest ``|sum_t engine log-prob - teacher-forced log pi(y|x)| / tokens`` over the completions whose
    engine reported per-token log-probs (None when none did): how far the engine's model is from the
    policy's weights. With the same weights it is float noise; after a missed weight update it is not."""
    gaps = [
        abs(sum(c.token_logprobs) - logp) / max(1, len(c.token_ids))
        for c, logp in zip(completions, policy_logps, strict=True)
        if c.token_logprobs is not None
    ]
    return max(gaps) if gaps else None


# ------------------------------------------------------------------------ named models, for the commands


def find_served_model(engine: VllmEngine, spec: str) -> ServedModel:
    """The model ``spec`` names on ``engine``'s server: a served name (``--served-model-name``, or the
    ``--model`` the server was started with; a LoRA adapter's name), else the directory the server loaded
    it from. A model the server does not serve is a one-line :class:`EngineError` naming both."""
    served = engine.served_models()
    named = next((m for m in served if m.name == spec), None)
    if named is not None:
        return named
    local = Path(spec).expanduser()
    if local.exists():
        for model in served:
            if model.root and Path(model.root).expanduser().exists() and Path(model.root).resolve() == local.resolve():
                return model
    names = ", ".join(m.name for m in served) or "no model"
    raise EngineError(
        f"the vLLM server at {engine.url} does not serve the model {spec!r} (it serves {names}): give one of "
        "those names (or the directory the server loaded it from), or start the server on this model"
    )


@dataclass
class ModelSampler:
    """A model opened for sampling: its engine, its tokenizer (prompts are encoded and completions decoded
    with it, whichever engine samples) and, on a vLLM server, the served model it is."""

    engine: SamplingEngine
    tokenizer: Any
    served: ServedModel | None = None
    processor: Any = None  # a vision-language model's processor (dpokit engine)


def open_sampler(
    spec: str, options: EngineOptions, load: LoadOptions | None = None, *, batch_size: int = DEFAULT_BATCH_SIZE
) -> ModelSampler:
    """The model ``spec`` ready to sample with the engine ``options`` name.

    ``dpokit``: ``spec`` is a model, LoRA adapter or checkpoint directory (or hub id), loaded here with
    ``load``. ``vllm``: ``spec`` must be served by the server at ``options.url`` (:func:`find_served_model`);
    nothing is loaded but the tokenizer, read from ``spec`` when it is a directory, else from the directory
    the server loaded the model (or, for an adapter, its base) from -- so that directory must be visible here
    (the same machine, or a shared file system). ``load`` (dtype, device) applies to the dpokit engine only."""
    from dpokit.models import LoadOptions, load_policy, load_tokenizer

    options.validate()
    load = load or LoadOptions()
    if options.engine == "dpokit":
        loaded = load_policy(spec, load)
        engine = DpokitEngine(loaded.model, loaded.tokenizer, batch_size=batch_size, processor=loaded.processor)
        return ModelSampler(engine, loaded.tokenizer, processor=loaded.processor)
    assert options.url is not None  # validated
    probe = VllmEngine(options.url, api_key_env=options.api_key_env, setting="--engine-url")
    served = find_served_model(probe, spec)
    places = [p for p in (spec, served.root, served.parent_root) if p and Path(p).expanduser().is_dir()]
    if not places:
        raise EngineError(
            f"the tokenizer of {served.name!r} (served by the vLLM server at {probe.url} from {served.root}) is needed "
            "here to encode the prompts and decode the samples, and that directory is not visible on this machine: "
            "run where it is (a shared file system)"
        )
    tokenizer = load_tokenizer(*places, trust_remote_code=load.trust_remote_code)
    vllm = VllmEngine(
        options.url, model=served.name, tokenizer=tokenizer, api_key_env=options.api_key_env, setting="--engine-url"
    )
    return ModelSampler(vllm, tokenizer, served)


# ------------------------------------------------------------------------------------ prompts to texts


@dataclass
class Sample:
    """One generated completion. ``prompt_text`` is the exact text the model was conditioned on (each
    image as its placeholder); ``images`` names the prompt's images (their paths, ``<bytes>``, ...)."""

    prompt_index: int
    sample_index: int
    prompt: Prompt
    prompt_text: str
    completion: str
    num_tokens: int
    images: list[str] = field(default_factory=list)


def generate_samples(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    sampling: SamplingConfig | None = None,
    *,
    chat_template: str = "auto",
    system: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    engine: SamplingEngine | None = None,
    rows: Sequence[PromptRow] | None = None,
    processor: Any = None,
) -> list[Sample]:
    """``sampling.num_samples`` decoded completions per prompt (default :class:`SamplingConfig`),
    ``len(prompts) * num_samples`` samples, prompt-major, drawn by ``engine`` (default: the dpokit engine
    on ``model``; with an engine, ``model`` is not used). Prompts are formatted and encoded with
    ``tokenizer`` (:func:`~dpokit.generation.sampler.encode_prompts`); ``num_tokens`` counts the
    completion's tokens before its stop token. ``rows``: the prompts as :class:`PromptRow` s instead
    (their images, and their locations for errors); a vision-language model's ``processor`` turns each
    image placeholder into the image's tokens."""
    sampling = sampling or SamplingConfig()
    if rows is not None:
        prompts = [row.prompt for row in rows]
    images = [list(row.images) for row in rows] if rows is not None else None
    where = [row.where for row in rows] if rows is not None else None
    texts, ids = encode_prompts(
        tokenizer, prompts, chat_template=chat_template, system=system, images=images, processor=processor, where=where
    )
    sampler = engine if engine is not None else DpokitEngine(model, tokenizer, batch_size=batch_size, processor=processor)
    return [
        Sample(
            prompt_index=c.prompt_index,
            sample_index=c.sample_index,
            prompt=prompts[c.prompt_index],
            prompt_text=texts[c.prompt_index],
            completion=c.text,
            num_tokens=len(c.content_ids),
            images=list(rows[c.prompt_index].image_names) if rows is not None else [],
        )
        for c in (sampler.sample(ids, sampling, images) if images and any(images) else sampler.sample(ids, sampling))
    ]


# --------------------------------------------------------------------------------------- dpokit generate


@dataclass
class GenerateJob:
    """What ``dpokit generate`` does: sample from ``model`` for ``prompts`` (plus those of ``prompts_file``),
    with the engine ``engine`` names (with vLLM, ``model`` is a model the server serves)."""

    model: str
    prompts: list[Prompt] = field(default_factory=list)
    prompts_file: str | None = None
    chat_template: str = "auto"
    system: str | None = None
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    load: LoadOptions = field(default_factory=LoadOptions)
    engine: EngineOptions = field(default_factory=EngineOptions)


def run_generate(job: GenerateJob) -> list[Sample]:
    """Open the model (:func:`open_sampler`) and sample the job's prompts."""
    rows = [PromptRow(prompt, f"--prompt {i + 1}") for i, prompt in enumerate(job.prompts)]
    rows += read_prompt_rows(job.prompts_file, images=True) if job.prompts_file else []
    if not rows:
        raise ConfigError("no prompts: give --prompt TEXT (repeatable) or --prompts-file FILE")
    job.sampling.validate()
    if any(row.images for row in rows) and job.engine.engine != "dpokit":
        raise ConfigError("prompts with images are sampled with the dpokit engine only (--engine dpokit), not vLLM")
    opened = open_sampler(job.model, job.engine, job.load)
    return generate_samples(
        None,
        opened.tokenizer,
        [],
        job.sampling,
        chat_template=job.chat_template,
        system=job.system,
        engine=opened.engine,
        rows=rows,
        processor=opened.processor,
    )
