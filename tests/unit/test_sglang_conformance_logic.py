"""Pure logic behind SGLang conformance: the API-key rule, aborted items, the top_k rule, the
sgl_kernel stand-in's two ops, the SGLang server command line, and resampling aborted groups."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from catq.config import SamplingConfig
from catq.engines.client import EngineError, parse_completion
from catq.engines.app import request_allowed
from catq.engines.sglang_env import STANDIN_DIR, server_argv, server_env


@pytest.mark.parametrize("path,header,api,admin,allowed", [
    ("/health", None, "k", "a", True),
    ("/generate", None, "", "", True),
    ("/generate", None, "k", "", False),
    ("/generate", "Bearer k", "k", "a", True),
    ("/generate", "Bearer a", "k", "a", False),        # the admin key is not the API key
    ("/generate", None, "", "a", True),                 # admin key only: ordinary routes open
    ("/update_weights_from_disk", "Bearer k", "k", "a", False),
    ("/update_weights_from_disk", "Bearer a", "k", "a", True),
    ("/update_weights_from_disk", "Bearer k", "k", "", True),
    ("/pause_generation", "bearer a", "", "a", True),
    ("/model_info", "Basic k", "k", "", False),
])
def test_request_allowed_follows_sglang(path, header, api, admin, allowed):
    assert request_allowed(path, header, api, admin) is allowed


def test_an_aborted_item_without_prompt_tokens_parses_as_aborted():
    item = {"text": "", "output_ids": [], "meta_info": {
        "id": "x", "finish_reason": {"type": "abort", "message": "Abort before prefill"},
        "weight_version": "3"}}
    completion = parse_completion(item, return_logprob=True)
    assert completion.aborted and completion.prompt_tokens == 0 and completion.weight_version == "3"
    with pytest.raises(EngineError, match="malformed"):
        parse_completion({"text": "", "output_ids": [], "meta_info": {"finish_reason": {"type": "stop"}}}, True)


def test_top_k_zero_is_refused_in_config():
    assert SamplingConfig(top_k=-1).top_k == -1 and SamplingConfig(top_k=1).top_k == 1
    with pytest.raises(ValueError, match="top_k must be -1"):
        SamplingConfig(top_k=0)


def load_standin():
    spec = importlib.util.spec_from_file_location("sgl_kernel_standin", STANDIN_DIR / "sgl_kernel" / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_standin_assign_req_to_token_pool_lays_slices_in_order():
    kernels = load_standin()
    table = torch.zeros((3, 6), dtype=torch.int32)
    kernels.assign_req_to_token_pool_cpu(
        torch.tensor([2, 0]), table, torch.tensor([1, 0]), torch.tensor([3, 3]),
        torch.tensor([10, 11, 20, 21, 22]), 6)
    assert table[2].tolist() == [0, 10, 11, 0, 0, 0]
    assert table[0].tolist() == [20, 21, 22, 0, 0, 0]


def test_standin_copy_all_layer_kv_cache_copies_rows_in_every_buffer():
    kernels = load_standin()
    buffers = [torch.arange(12, dtype=torch.float32).reshape(4, 3), torch.arange(8, dtype=torch.int64).reshape(4, 2)]
    expected = [b.clone() for b in buffers]
    for b in expected:
        b[[0, 1]] = b[[1, 2]].clone()  # overlapping: row 1 is a source and a target
    kernels.copy_all_layer_kv_cache_cpu(
        torch.tensor([b.data_ptr() for b in buffers]), torch.tensor([b.stride(0) * b.element_size() for b in buffers]),
        torch.tensor([0, 1]), torch.tensor([1, 2]))
    assert all(torch.equal(b, e) for b, e in zip(buffers, expected))
    with pytest.raises(NotImplementedError, match="stand-in"):
        kernels.some_cuda_only_op()


def test_sglang_cpu_server_command_and_environment():
    argv = server_argv("/env/bin/python", "/m", host="127.0.0.1", port=31000, device="cpu", api_key="k")
    assert argv[:3] == ["/env/bin/python", "-m", "sglang.launch_server"]
    for flag in ("--device", "--attention-backend", "--sleep-on-idle", "--api-key"):
        assert flag in argv
    assert "--device" not in server_argv("python", "/m", host="h", port=1, device="cuda")
    env = server_env({"PYTHONPATH": "/x"}, "cpu")
    assert env["SGLANG_RETURN_ORIGINAL_LOGPROB"] == "1" and env["SGLANG_USE_CPU_ENGINE"] == "1"
    assert env["PYTHONPATH"].split(":")[0] == str(STANDIN_DIR)
    gpu = server_env({}, "cuda")
    assert "SGLANG_USE_CPU_ENGINE" not in gpu and "PYTHONPATH" not in gpu


def test_sglang_on_cpu_serves_lora_with_its_torch_native_backend():
    from catq.engines.lora import server_flags

    flags = tuple(server_flags(rank=8, target_modules=["q_proj", "v_proj"]))
    argv = server_argv("python", "/m", host="h", port=1, device="cpu", extra=flags)
    assert argv[argv.index("--lora-backend") + 1] == "torch_native"
    assert argv[-len(flags):] == list(flags)
    assert "--lora-backend" not in server_argv("python", "/m", host="h", port=1, device="cuda", extra=flags)
    assert "--lora-backend" not in server_argv("python", "/m", host="h", port=1, device="cpu")
    chosen = server_argv("python", "/m", host="h", port=1, device="cpu", extra=(*flags, "--lora-backend", "triton"))
    assert chosen.count("--lora-backend") == 1  # the operator's choice stands


def test_a_cpu_sglang_server_gets_unpinned_memory_where_it_asks_for_pinned():
    """SGLang's LoRA layers ask for pinned host memory, which torch refuses without a GPU; on the
    server's PYTHONPATH the stand-in directory's sitecustomize makes pinning return plain memory."""
    import subprocess
    import sys

    code = ("import torch; a = torch.tensor([1, 2], pin_memory=True); b = torch.zeros(2, pin_memory=True); "
            "print(a.tolist(), b.pin_memory().tolist(), a.is_pinned())")
    env = server_env({"PATH": "/usr/bin:/bin"}, "cpu")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["[1,", "2]", "[0.0,", "0.0]", "False"]


def test_a_prefill_item_must_score_exactly_the_expected_tokens():
    from catq.engines.client import parse_input_logprobs

    item = {"meta_info": {"input_token_logprobs": [[None, 6, None], [-0.5, 7, None], [-1.5, 8, None]]}}
    assert parse_input_logprobs(item, [6, 7, 8]) == [None, -0.5, -1.5]
    for bad, expected in ((item, [6, 7, 9]), ({"meta_info": {}}, [7]),
                          ({"meta_info": {"input_token_logprobs": [[None, 6, None], [None, 7, None]]}}, [6, 7])):
        with pytest.raises(EngineError, match="malformed prefill item"):
            parse_input_logprobs(bad, expected)


def test_the_gpu_extra_pins_the_sglang_release_catq_follows():
    """The `gpu` extra installs the SGLang whose API catq's client and engine follow field for
    field (and whose CPU environment the conformance suite runs against)."""
    import tomllib
    from pathlib import Path

    from catq.engines.sglang_env import SGLANG_VERSION

    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]
    assert project["optional-dependencies"]["gpu"] == [f"sglang=={SGLANG_VERSION}"]
    assert not any("sglang" in d for d in project["dependencies"])
