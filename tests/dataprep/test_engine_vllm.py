"""The vllm engine: request building without vllm; the real engine where vllm and CUDA exist."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
from PIL import Image

from dataprep.engines import ChatRequest, EngineConfig, Sampling, load_engine
from dataprep.errors import ConfigError
from dataprep.engines.vllm_engine import INSTALL_FIX, MAX_MODEL_LEN, llm_kwargs, render_prompt, sampling_kwargs, to_result, vllm_input


def _has_vllm_and_cuda() -> tuple[bool, str]:
    if importlib.util.find_spec("vllm") is None:
        return False, "vllm is not installed (pip install 'softrepa-dataprep[vllm]')"
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA GPU visible"
    return True, ""


HAVE_VLLM, WHY_NOT = _has_vllm_and_cuda()


@pytest.fixture(scope="module")
def templates(tiny_models):
    from transformers import AutoProcessor, AutoTokenizer

    return AutoProcessor.from_pretrained(tiny_models / "llava"), AutoTokenizer.from_pretrained(tiny_models / "llama")


def test_render_prompt_places_image_token_in_last_user_turn(templates):
    proc, _ = templates
    req = ChatRequest(messages=[{"role": "user", "content": "Describe the object and background in the image."}], image=Image.new("RGB", (30, 30)))
    text = render_prompt(proc.apply_chat_template, req, is_vision=True)
    assert text.count("<image>") == 1 and text.index("<image>") < text.index("Describe")
    assert text.rstrip().endswith("ASSISTANT:")
    no_image = render_prompt(proc.apply_chat_template, ChatRequest(messages=req.messages), is_vision=True)
    assert "<image>" not in no_image


def test_render_prompt_text_model_keeps_system_first(templates):
    _, tok = templates
    req = ChatRequest(messages=[{"role": "system", "content": "RULES"}, {"role": "user", "content": "a dog"}])
    text = render_prompt(tok.apply_chat_template, req, is_vision=False)
    assert text.index("RULES") < text.index("a dog") and text.rstrip().endswith("ASSISTANT:")
    # the shared prefix (what vLLM's prefix cache reuses) is identical across requests
    other = render_prompt(tok.apply_chat_template, ChatRequest(messages=[req.messages[0], {"role": "user", "content": "a cat"}]), is_vision=False)
    assert other[: text.index("a dog")] == text[: text.index("a dog")]


def test_vllm_input_carries_rgb_image():
    assert vllm_input("p") == {"prompt": "p"}
    item = vllm_input("p", Image.new("L", (4, 4), 7))
    assert item["prompt"] == "p" and item["multi_modal_data"]["image"].mode == "RGB"


def test_sampling_kwargs():
    assert sampling_kwargs(Sampling(max_new_tokens=9, seed=3)) == {"max_tokens": 9, "temperature": 0.0, "top_p": 1.0, "seed": 3}
    kw = sampling_kwargs(Sampling(temperature=0.8, top_p=0.9, max_new_tokens=5), {"min_tokens": 5, "ignore_eos": True})
    assert kw == {"max_tokens": 5, "temperature": 0.8, "top_p": 0.9, "min_tokens": 5, "ignore_eos": True}


def test_to_result_reads_finish_reason_and_token_counts():
    out = SimpleNamespace(prompt_token_ids=[1, 2, 3], outputs=[SimpleNamespace(text=" a fox ", finish_reason="length", token_ids=[5, 6])])
    r = to_result(out)
    assert (r.text, r.finish_reason, r.prompt_tokens, r.completion_tokens, r.error) == ("a fox", "length", 3, 2, None)
    aborted = to_result(SimpleNamespace(prompt_token_ids=[1], outputs=[SimpleNamespace(text="", finish_reason="abort", token_ids=[])]))
    assert aborted.finish_reason == "error" and "abort" in aborted.error
    assert to_result(SimpleNamespace(outputs=[])).error


def test_llm_kwargs(tmp_path):
    cfg = EngineConfig(engine="vllm", model="meta-llama/Llama-3.1-8B-Instruct", tensor_parallel_size=2, gpu_memory_utilization=0.8)
    kw = llm_kwargs(cfg, is_vision=False, max_positions=131072)
    assert kw["enable_prefix_caching"] is True and kw["tensor_parallel_size"] == 2 and kw["gpu_memory_utilization"] == 0.8
    assert kw["max_model_len"] == MAX_MODEL_LEN and "limit_mm_per_prompt" not in kw and "quantization" not in kw
    v = llm_kwargs(EngineConfig(engine="vllm", model=str(tmp_path), quantize="4bit"), is_vision=True, max_positions=4096)
    assert v["limit_mm_per_prompt"] == {"image": 1} and v["quantization"] == "bitsandbytes" and "max_model_len" not in v
    assert v["model"] == str(tmp_path)
    for bad, flag in [(dict(quantize="8bit"), "--quantize"), (dict(tensor_parallel_size=0), "--tensor-parallel-size"), (dict(gpu_memory_utilization=1.5), "--gpu-memory-utilization")]:
        with pytest.raises(ConfigError, match=flag):
            llm_kwargs(EngineConfig(engine="vllm", model="m", **bad), False, None)


@pytest.mark.skipif(HAVE_VLLM, reason="checks the message shown where vllm or CUDA is missing")
def test_missing_vllm_or_cuda_is_a_config_error_with_the_install_line(tiny_models):
    with pytest.raises(ConfigError) as e:
        load_engine(EngineConfig(engine="vllm", model=str(tiny_models / "llama")))
    assert "--engine" in str(e.value) and (INSTALL_FIX in str(e.value) or "CUDA" in str(e.value))
    with pytest.raises(ConfigError, match="--device cpu"):
        load_engine(EngineConfig(engine="vllm", model=str(tiny_models / "llama"), device="cpu"))


# ------------------------------------------------------------ the real engine


@pytest.mark.vllm
@pytest.mark.skipif(not HAVE_VLLM, reason=f"real vllm engine test: {WHY_NOT}")
def test_real_engine_text_then_vision_and_close_frees_memory(tiny_models):
    import torch

    base = torch.cuda.memory_allocated()
    llama = load_engine(EngineConfig(engine="vllm", model=str(tiny_models / "llama"), gpu_memory_utilization=0.3))
    reqs = [ChatRequest(messages=[{"role": "system", "content": "RULES " * 40}, {"role": "user", "content": c}], sampling=Sampling(max_new_tokens=6, seed=1)) for c in ("a dog", "a cat", "a red car")]
    out = llama.generate(reqs)
    assert all(r.error is None and r.completion_tokens >= 1 and r.prompt_tokens > 40 for r in out)
    assert [r.text for r in llama.generate(reqs)] == [r.text for r in out]  # greedy is reproducible
    llama.close()
    llava = load_engine(EngineConfig(engine="vllm", model=str(tiny_models / "llava"), gpu_memory_utilization=0.3))
    img = ChatRequest(messages=[{"role": "user", "content": "Describe the object and background in the image."}], image=Image.new("RGB", (30, 30), (200, 0, 0)), sampling=Sampling(max_new_tokens=6))
    res = llava.generate([img, img])
    assert all(r.error is None for r in res) and res[0].prompt_tokens > 25  # image tokens were expanded
    llava.close()
    assert torch.cuda.memory_allocated() <= base + (64 << 20)


def test_prompt_reaches_vllm_with_exactly_one_bos(tiny_models):
    """LLM.generate tokenizes text prompts with add_special_tokens=True; a chat
    template that writes BOS itself (Llama-3.1) gave the model two."""
    from transformers import AutoTokenizer

    from dataprep.engines.vllm_engine import template_bos

    req = ChatRequest(messages=[{"role": "system", "content": "Rules."}, {"role": "user", "content": "A dog."}])
    adds = AutoTokenizer.from_pretrained(tiny_models / "llama", add_bos_token=True)  # like Llama-3.1's tokenizer
    prompt = render_prompt(adds.apply_chat_template, req, is_vision=False, drop_prefix=template_bos(adds))
    ids = adds(vllm_input(prompt)["prompt"], add_special_tokens=True)["input_ids"]  # what vLLM does with it
    assert ids[:1] == [adds.bos_token_id] and ids[1] != adds.bos_token_id
    plain = AutoTokenizer.from_pretrained(tiny_models / "llama")  # adds no BOS: the template's must stay
    assert template_bos(plain) is None
    assert render_prompt(plain.apply_chat_template, req, is_vision=False, drop_prefix=template_bos(plain)).startswith(plain.bos_token)
