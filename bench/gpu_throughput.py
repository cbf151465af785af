#!/usr/bin/env python
"""Rewrite and caption throughput of the project's engines on one GPU.

Never run by CI. Builds random-weight models with the real configs of
Llama-3.1-8B-Instruct and LLaVA-1.5-13B (written inline: no downloads; the
tokenizer is the tiny one from ``dataprep.tiny``, so prompts are built from
its token ids to a fixed length), then measures, in one run:

- rewrite: >= 512 requests (system prompt ~600 tokens shared by all, ~100-token
  caption each) through ``TransformersEngine`` (shared-prefix KV cache, length
  grouping, auto batch size), and the naive one-request-at-a-time ``generate``
  loop on a small sample;
- caption: 128 images (336x336, 576 image tokens) the same two ways;
- the same through the vllm engine when vllm is importable (``load_format=dummy``);
- on a few requests, whether the shared-prefix path gives the plain path's
  greedy text (reported, not asserted: bf16 can flip a near tie).

Every run produces exactly ``--new-tokens`` tokens (min = max), so throughput
does not depend on when random weights happen to emit EOS. Prints one JSON
object: prompts/s, images/s, output tokens/s, peak memory, ratio to the naive
loop, the GPU name.

    python bench/gpu_throughput.py            # one GPU, ~5 min on an H100
    python bench/gpu_throughput.py --tiny     # CPU smoke test with the tiny models (seconds)

Imports only what the engines need (torch, transformers, PIL): it runs from
the source tree on a machine without prefect or datasets.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from the source tree

CAPTION_PROMPT = "Describe the object and background in the image."


# ------------------------------------------------------------ models (real shapes, random weights)


def llama31_8b_config(tok):
    """Llama-3.1-8B-Instruct's config.json, except token ids (the tiny tokenizer's)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, hidden_act="silu", max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )


def llava15_13b_config(tok, image_token_id: int):
    """llava-hf/llava-1.5-13b-hf's config: Vicuna-13B + CLIP ViT-L/14 at 336 px, 576 image tokens."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(
        vocab_size=32064, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
        num_key_value_heads=40, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    return LlavaConfig(text_config=text, vision_config=vision, image_token_index=image_token_id, projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default")


def tiny_llava_config(tok, image_token_id: int):
    from transformers import CLIPVisionConfig, LlavaConfig

    from dataprep.tiny import _llama_config

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=30, patch_size=6)
    return LlavaConfig(text_config=_llama_config(len(tok), tok), vision_config=vision, image_token_index=image_token_id, vision_feature_layer=-2, vision_feature_select_strategy="default")


def llava_processor(tok, side: int, patch: int):
    from transformers import CLIPImageProcessor, LlavaProcessor

    from dataprep.tiny import CHAT_TEMPLATE

    return LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}),
        tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )


def build(model_cls, config, device: str, dtype):
    """Random weights allocated directly on ``device`` (no CPU copy of 16-26 GB)."""
    import torch

    torch.manual_seed(0)
    with torch.device(device):
        net = model_cls._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return net.eval()


# ------------------------------------------------------------ requests of fixed length


def text_of_tokens(tok, source: str, n: int) -> str:
    """Text whose tiny-tokenizer encoding is ~n tokens: the first n ids of ``source`` (repeated), decoded."""
    ids = tok(source, add_special_tokens=False)["input_ids"]
    ids = (ids * (n // max(1, len(ids)) + 1))[:n]
    return tok.decode(ids)


def rewrite_requests(tok, n: int, system_tokens: int, caption_tokens: int, new_tokens: int):
    from dataprep.engines import ChatRequest, Sampling
    from dataprep.promptfile import load_prompt

    rules = text_of_tokens(tok, load_prompt("edit.txt", flag="--rules").text, system_tokens)
    base = "The image features a brown dog with a blue nose standing in a grassy field next to a yellow building. "
    return [
        ChatRequest(messages=[{"role": "system", "content": rules}, {"role": "user", "content": f"{i} " + text_of_tokens(tok, base[i % 37 :] + base, caption_tokens)}], sampling=Sampling(max_new_tokens=new_tokens), request_id=str(i))
        for i in range(n)
    ]


def caption_requests(n: int, side: int, new_tokens: int):
    import numpy as np
    from PIL import Image

    from dataprep.engines import ChatRequest, Sampling

    rng = np.random.default_rng(0)
    return [
        ChatRequest(messages=[{"role": "user", "content": CAPTION_PROMPT}], image=Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)), sampling=Sampling(max_new_tokens=new_tokens), request_id=str(i))
        for i in range(n)
    ]


# ------------------------------------------------------------ measurement


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB -> GiB (process RSS)


def timed_engine(engine, reqs) -> dict:
    reset_peak()
    sync()
    t0 = time.perf_counter()
    res = engine.generate(reqs)
    sync()
    dt = time.perf_counter() - t0
    errors = [r.error for r in res if r.error]
    out_tokens = sum(r.completion_tokens for r in res)
    return {
        "requests": len(reqs), "seconds": round(dt, 2), "per_s": round(len(reqs) / dt, 3), "output_tokens_per_s": round(out_tokens / dt, 1),
        "mean_prompt_tokens": round(sum(r.prompt_tokens for r in res) / max(1, len(res)), 1), "mean_output_tokens": round(out_tokens / max(1, len(res)), 1),
        "errors": len(errors), "first_error": errors[0] if errors else None, "peak_gib": round(peak_gib(), 2),
    }


def timed_naive(engine, reqs, new_tokens: int) -> dict:
    """The baseline: one request at a time through plain ``generate`` (no batching, no prefix cache)."""
    net, tok = engine.net, engine.tokenizer
    reset_peak()
    sync()
    t0 = time.perf_counter()
    out_tokens = 0
    for r in reqs:
        prompt = engine.render(r)
        if engine.is_vision:
            inputs = engine.processor(images=[r.image], text=[prompt], return_tensors="pt").to(net.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(net.dtype)
        else:
            inputs = tok([prompt], return_tensors="pt", add_special_tokens=False).to(net.device)
        out = net.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        out_tokens += out.shape[1] - inputs["input_ids"].shape[1]
    sync()
    dt = time.perf_counter() - t0
    return {"requests": len(reqs), "seconds": round(dt, 2), "per_s": round(len(reqs) / dt, 3), "output_tokens_per_s": round(out_tokens / dt, 1), "peak_gib": round(peak_gib(), 2)}


def prefix_matches_plain(engine, reqs) -> str:
    """k/n requests whose greedy text is the same with and without the shared-prefix cache."""
    engine.share_prefix, engine._prefix = False, None
    plain = engine.generate(reqs)
    engine.share_prefix = True
    fast = engine.generate(reqs)
    used = engine._prefix is not None
    same = sum(a.text == b.text for a, b in zip(plain, fast))
    return f"{same}/{len(reqs)}" + ("" if used else " (prefix path not used)")


def free(*objs) -> None:
    import torch

    for o in objs:
        close = getattr(o, "close", None)
        if callable(close):
            close()
    del objs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------ stages


def bench_rewrite(a, tok, report: dict) -> None:
    import torch
    from transformers import LlamaForCausalLM

    from dataprep.engines import EngineConfig
    from dataprep.engines.hf import TransformersEngine
    from dataprep.tiny import _llama_config

    config = _llama_config(len(tok), tok) if a.tiny else llama31_8b_config(tok)
    t0 = time.perf_counter()
    net = build(LlamaForCausalLM, config, a.device, a.dtype)
    engine = TransformersEngine.from_model(net, tok, cfg=EngineConfig(model="random Llama-3.1-8B-Instruct" if not a.tiny else "tiny llama", batch_size=a.batch_size))
    engine.generate_kwargs = {"min_new_tokens": a.new_tokens}  # fixed output length
    r: dict = {"model": engine.model, "build_s": round(time.perf_counter() - t0, 1), "batch_size": engine.batch_size}
    reqs = rewrite_requests(tok, a.n_rewrite, a.system_tokens, a.caption_tokens, a.new_tokens)
    engine.generate(reqs[:2])  # warm-up (CUDA context, kernels)
    r["engine"] = timed_engine(engine, reqs)
    r["prefix_tokens"] = len(engine._prefix[0]) if engine._prefix else 0
    r["naive"] = timed_naive(engine, reqs[: a.naive_n], a.new_tokens)
    r["speedup_vs_naive"] = round(r["engine"]["per_s"] / r["naive"]["per_s"], 1)
    engine.generate_kwargs = {}
    r["prefix_vs_plain_same_greedy_text"] = prefix_matches_plain(engine, rewrite_requests(tok, 8, a.system_tokens, a.caption_tokens, min(a.new_tokens, 24)))
    report["rewrite_transformers"] = r
    free(engine, net)
    del engine, net
    free()


def bench_caption(a, tok_img, report: dict) -> None:
    from transformers import LlavaForConditionalGeneration

    from dataprep.engines import EngineConfig
    from dataprep.engines.hf import TransformersEngine

    image_id = tok_img.convert_tokens_to_ids("<image>")
    side, patch = (30, 6) if a.tiny else (336, 14)
    config = tiny_llava_config(tok_img, image_id) if a.tiny else llava15_13b_config(tok_img, image_id)
    t0 = time.perf_counter()
    net = build(LlavaForConditionalGeneration, config, a.device, a.dtype)
    processor = llava_processor(tok_img, side, patch)
    engine = TransformersEngine.from_model(net, tok_img, processor, cfg=EngineConfig(model="random LLaVA-1.5-13B" if not a.tiny else "tiny llava", batch_size=a.batch_size))
    engine.generate_kwargs = {"min_new_tokens": a.new_tokens}
    r: dict = {"model": engine.model, "build_s": round(time.perf_counter() - t0, 1), "batch_size": engine.batch_size}
    reqs = caption_requests(a.n_images, side, a.new_tokens)
    engine.generate(reqs[:2])
    r["engine"] = timed_engine(engine, reqs)
    r["naive"] = timed_naive(engine, reqs[: a.naive_n], a.new_tokens)
    r["speedup_vs_naive"] = round(r["engine"]["per_s"] / r["naive"]["per_s"], 1)
    report["caption_transformers"] = r
    free(engine, net)
    del engine, net
    free()


def bench_vllm(a, tok, tok_img, report: dict, work: Path) -> None:
    """The vllm engine with dummy (random) weights of the same configs; errors are reported, not raised."""
    from dataprep.engines import EngineConfig
    from dataprep.engines.vllm_engine import VLLMEngine

    jobs = [
        ("rewrite_vllm", llama31_8b_config(tok), tok, None, lambda: rewrite_requests(tok, a.n_rewrite, a.system_tokens, a.caption_tokens, a.new_tokens)),
        ("caption_vllm", llava15_13b_config(tok_img, tok_img.convert_tokens_to_ids("<image>")), tok_img, llava_processor(tok_img, 336, 14), lambda: caption_requests(a.n_images, 336, a.new_tokens)),
    ]
    for name, config, t, proc, make in jobs:
        d = work / name
        config.save_pretrained(d)
        (proc or t).save_pretrained(d)
        engine = None
        try:
            t0 = time.perf_counter()
            engine = VLLMEngine(EngineConfig(engine="vllm", model=str(d), gpu_memory_utilization=0.85), load_format="dummy")
            # fixed length; random ids beyond the tiny vocab cannot be detokenized, and need not be
            engine.sampling_extra = {"min_tokens": a.new_tokens, "ignore_eos": True, "detokenize": False}
            r = {"build_s": round(time.perf_counter() - t0, 1)}
            reqs = make()
            engine.generate(reqs[:2])
            r["engine"] = timed_engine(engine, reqs)
            report[name] = r
        except Exception as exc:  # report and go on: the transformers figures still stand
            report[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        finally:
            if engine is not None:
                engine.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny models, few requests, few tokens")
    p.add_argument("--n-rewrite", type=int, default=None, help="rewrite requests (default 512; tiny 16)")
    p.add_argument("--n-images", type=int, default=None, help="caption images (default 128; tiny 8)")
    p.add_argument("--naive-n", type=int, default=None, help="requests for the one-at-a-time baseline (default 4; tiny 2)")
    p.add_argument("--new-tokens", type=int, default=None, help="output tokens per request, fixed (default 100; tiny 8)")
    p.add_argument("--system-tokens", type=int, default=None, help="shared system prompt length (default 600; tiny 96)")
    p.add_argument("--caption-tokens", type=int, default=None, help="caption length in a rewrite request (default 100; tiny 24)")
    p.add_argument("--batch-size", default="auto", help="engine batch size: an integer or auto (from free GPU memory)")
    p.add_argument("--skip", default="", help="comma list of parts to skip: rewrite,caption,vllm")
    p.add_argument("--work", default="/tmp/gpu_throughput", help="scratch dir for vllm's config-only model dirs")
    a = p.parse_args()

    import torch
    import transformers

    defaults = dict(n_rewrite=(16, 512), n_images=(8, 128), naive_n=(2, 4), new_tokens=(8, 100), system_tokens=(96, 600), caption_tokens=(24, 100))
    for k, (tiny, full) in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, tiny if a.tiny else full)
    if a.tiny:
        a.device, a.dtype = "cpu", torch.float32
        if a.batch_size == "auto":
            a.batch_size = "8"
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA GPU: run with --tiny for the CPU smoke test")
        a.device, a.dtype = "cuda", torch.bfloat16
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}

    from dataprep.tiny import build_tokenizer

    tok, tok_img = build_tokenizer(), build_tokenizer(extra_special=("<image>",))
    report: dict = {
        "device": torch.cuda.get_device_name(0) if a.device == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__, "transformers": transformers.__version__, "tiny": a.tiny,
        "settings": {k: getattr(a, k) for k in ("n_rewrite", "n_images", "naive_n", "new_tokens", "system_tokens", "caption_tokens", "batch_size")},
    }
    t0 = time.perf_counter()
    if "rewrite" not in skip:
        bench_rewrite(a, tok, report)
    if "caption" not in skip:
        bench_caption(a, tok_img, report)
    if "vllm" not in skip and not a.tiny:
        try:
            import vllm  # noqa: F401
        except ImportError:
            report["vllm"] = "not installed: skipped"
        else:
            report["vllm_version"] = vllm.__version__
            bench_vllm(a, tok, tok_img, report, Path(a.work))
    report["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":  # vllm starts worker processes: keep the work under the main guard
    main()
