"""One real vLLM server for the test session (the ``vllm_server`` fixture, shared through tests/conftest.py).

vLLM runs in its own environment, ``.venv-vllm`` (``make vllm-env``; ``make test`` builds it): its pins
(transformers < 5.20) differ from the project's. The server is started once per session on 127.0.0.1,
on a free port, with an API key, and serves

* ``noise``: a random tiny Llama (head size 32, which vLLM's CPU attention supports) -- the base model,
  also the start model of the online runs that sample through it;
* ``judge``: a LoRA adapter on it that answers any judge question with ``Preferred: A`` (trained here on
  the decoder's linear layers for a few seconds, then written as an exact rank-128 adapter by SVD of
  the weight change).

Full-weight reloads (``VLLM_SERVER_DEV_MODE=1``) and runtime LoRA loading are switched on, as dpokit's
weight sync needs. Tests that change the server's weights give the base model back (``restore``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.helpers import tiny_llama, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("DPOKIT_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
API_KEY = "s3cret"
REPLY = "Comparison: the first is better.\nPreferred: A"
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_RANK = 128


@dataclass
class VllmServer:
    """A running server: its base URL (``http://127.0.0.1:PORT``), the base model's directory, its log."""

    url: str
    base_dir: Path
    log: Path
    process: subprocess.Popen[bytes]

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def post(self, path: str, body: dict) -> None:
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            response.read()

    def restore(self) -> None:
        """The base model's weights again, and no adapter but ``judge``."""
        self.post("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(self.base_dir)}})
        self.post("/reset_prefix_cache", {})
        with urllib.request.urlopen(self._request("/v1/models"), timeout=30) as response:
            served = [m["id"] for m in json.loads(response.read())["data"]]
        for name in served:
            if name not in ("noise", "judge"):
                self.post("/v1/unload_lora_adapter", {"lora_name": name})

    def _request(self, path: str) -> urllib.request.Request:
        return urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {API_KEY}"})


def _judge_questions(tokenizer) -> list[tuple[list[int], list[int]]]:
    from dpokit.judges.templates import BUILTIN_TEMPLATES

    template = BUILTIN_TEMPLATES["summarization"]
    words = ["good", "bad", "movie", "plot", "the actor", "long story"]
    rows = []
    for i in range(6):
        question = template.chat_prompt(words[i], words[(i + 1) % 6], words[(i + 2) % 6])
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        reply = tokenizer(REPLY + "<|im_end|>", add_special_tokens=False)["input_ids"]
        rows.append((tokenizer(prompt, add_special_tokens=False)["input_ids"], reply))
    return rows


def write_judge_adapter(base: torch.nn.Module, tokenizer, directory: Path) -> None:
    """Train a copy of ``base``'s linear layers to answer REPLY; save the change as an exact LoRA adapter."""
    import copy

    from safetensors.torch import save_file

    model = copy.deepcopy(base).train()
    for name, parameter in model.named_parameters():
        parameter.requires_grad = any(k in name for k in LINEAR)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    rows = _judge_questions(tokenizer)
    for step in range(120):
        prompt, reply = rows[step % len(rows)]
        loss = model(input_ids=torch.tensor([prompt + reply]), labels=torch.tensor([[-100] * len(prompt) + reply])).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    tensors = {}
    for (name, trained), (_, start) in zip(model.named_parameters(), base.named_parameters(), strict=True):
        if not trained.requires_grad:
            continue
        u, s, vh = torch.linalg.svd((trained - start).detach(), full_matrices=False)
        a, b = torch.zeros(LORA_RANK, vh.shape[1]), torch.zeros(u.shape[0], LORA_RANK)
        a[: len(s)], b[:, : len(s)] = vh, u * s
        stem = "base_model.model." + name.removesuffix(".weight")
        tensors[f"{stem}.lora_A.weight"], tensors[f"{stem}.lora_B.weight"] = a.contiguous(), b.contiguous()
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": LORA_RANK, "lora_alpha": LORA_RANK, "lora_dropout": 0.0}
    config.update({"target_modules": list(LINEAR), "bias": "none", "fan_in_fan_out": False, "base_model_name_or_path": "noise"})
    (directory / "adapter_config.json").write_text(json.dumps(config))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_server(root: Path, timeout_s: float = 600.0) -> VllmServer:
    """Write the models under ``root`` and start the server; wait until it answers."""
    base_dir, adapter_dir, log = root / "base", root / "judge", root / "server.log"
    base, tokenizer = tiny_llama(hidden_size=128, seed=0), tiny_tokenizer()
    # A chat turn ends at <|im_end|>: listed beside EOS, as chat models' generation configs do, so vLLM stops there.
    base.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    write_judge_adapter(base, tokenizer, adapter_dir)
    port = _free_port()
    command = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(base_dir)]
    command += ["--served-model-name", "noise", "--dtype", "float32", "--enforce-eager", "--max-model-len", "512"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--api-key", API_KEY, "--enable-lora"]
    command += ["--max-lora-rank", str(LORA_RANK), "--max-loras", "3", "--lora-modules", f"judge={adapter_dir}"]
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    env.update({"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "INFO"})
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=root)
    server = VllmServer(f"http://127.0.0.1:{port}", base_dir, log, process)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the vLLM server exited ({process.returncode}):\n{server.log_text()[-3000:]}")
        try:
            with urllib.request.urlopen(server._request("/v1/models"), timeout=5):
                return server
        except (urllib.error.URLError, OSError):
            time.sleep(1)
    stop_server(server)
    raise RuntimeError(f"the vLLM server did not answer within {timeout_s:.0f} s:\n{server.log_text()[-3000:]}")


def stop_server(server: VllmServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait(timeout=30)


# The one server of this test process: started by the first test that asks, stopped after the last of a run of
# tests that use it (tests/conftest.py keeps them together), so it does not hold CPU and memory while the rest
# of the suite runs. A later test that asks again starts it again.
_RUNNING: dict[str, VllmServer] = {}


@pytest.fixture
def vllm_server(tmp_path_factory):
    """The test process's vLLM server (skipped, saying how to install it, when .venv-vllm is missing)."""
    if not VLLM_PYTHON.is_file():
        pytest.skip(f"no vLLM environment at {VLLM_PYTHON}: run 'make vllm-env' (make test builds it)")
    if "server" not in _RUNNING:
        _RUNNING["server"] = start_server(tmp_path_factory.mktemp("vllm"))
    return _RUNNING["server"]


def release_vllm_server() -> None:
    """Stop the server if one is running."""
    server = _RUNNING.pop("server", None)
    if server is not None:
        stop_server(server)
