"""The transformers engine's fast paths: shared-prefix KV cache (same greedy
outputs as the plain path), middle padding, length grouping, auto batch size."""

from __future__ import annotations

from pathlib import Path

import pytest

from dataprep.engines import ChatRequest, EngineConfig, Sampling, load_engine
from dataprep.engines.hf import MIN_PREFIX_TOKENS, TransformersEngine, auto_batch_size, middle_pad, shared_prefix_len

SYSTEM = (
    "You are an AI assistant for generating paired text prompts for real image editing tasks. "
    "Modify only one object. Preserve all other words exactly as they are. Answer with the new prompt only."
)
CAPTIONS = [
    "A brown dog.",
    "The image features a brown dog with a blue nose standing in a grassy field.",
    "A yellow building with a green door and a window with white curtains.",
    "A rocky beach.",
    "A rocky beach with a large body of water and a dark cloudy sky.",
    "Two cats.",
]


def test_shared_prefix_len_leaves_a_suffix():
    assert shared_prefix_len([[1, 2, 3, 4], [1, 2, 3, 9], [1, 2, 5]]) == 2
    assert shared_prefix_len([[1, 2, 3], [1, 2, 3]]) == 2  # identical rows keep one own token
    assert shared_prefix_len([[7], [7, 8]]) == 0
    assert shared_prefix_len([[1, 2], [3, 4]]) == 0 and shared_prefix_len([]) == 0


def test_middle_pad_layout():
    ids, mask = middle_pad([5, 6], [[1], [1, 2, 3]], pad_id=0)
    assert ids == [[5, 6, 0, 0, 1], [5, 6, 1, 2, 3]]
    assert mask == [[1, 1, 0, 0, 1], [1, 1, 1, 1, 1]]


def test_auto_batch_size_follows_memory_and_length():
    from transformers import LlamaConfig

    llama8b = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8)
    llama13b = LlamaConfig(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40)
    gib = 1 << 30
    assert auto_batch_size(10 * gib, llama8b) < auto_batch_size(40 * gib, llama8b) <= 256
    assert auto_batch_size(40 * gib, llama13b) < auto_batch_size(40 * gib, llama8b)  # 5x the KV per token
    assert auto_batch_size(40 * gib, llama8b, tokens_per_seq=4096) < auto_batch_size(40 * gib, llama8b, tokens_per_seq=1024)
    assert auto_batch_size(1, llama13b) == 1 and auto_batch_size(10_000 * gib, llama8b) == 256


@pytest.fixture(scope="module")
def llama(tiny_models):
    engine = load_engine(EngineConfig(model=str(tiny_models / "llama"), batch_size="4", device="cpu"))
    yield engine
    engine.close()


def rewrite_requests(captions=CAPTIONS, max_new_tokens=12):
    return [
        ChatRequest(messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": c}], sampling=Sampling(max_new_tokens=max_new_tokens))
        for c in captions
    ]


def test_shared_prefix_gives_the_plain_paths_greedy_outputs(llama):
    reqs = rewrite_requests()
    llama.share_prefix, llama._prefix = False, None
    plain = llama.generate(reqs)
    assert llama._prefix is None
    llama.share_prefix = True
    fast = llama.generate(reqs)
    assert llama._prefix is not None and len(llama._prefix[0]) >= MIN_PREFIX_TOKENS  # the fast path ran
    assert [r.text for r in fast] == [r.text for r in plain]
    assert [(r.prompt_tokens, r.completion_tokens, r.finish_reason) for r in fast] == [(r.prompt_tokens, r.completion_tokens, r.finish_reason) for r in plain]
    assert all(r.error is None for r in fast) and len({r.prompt_tokens for r in fast}) > 1  # rows of different lengths


def test_prefix_cache_is_computed_once_and_reused(llama):
    llama.share_prefix, llama._prefix = True, None
    llama.generate(rewrite_requests(CAPTIONS[:3]))
    first = llama._prefix
    llama.generate(rewrite_requests(CAPTIONS[3:]))
    assert llama._prefix is first  # same object: no second prefix forward pass
    # the cached prefix is the system prompt's tokens: it never reaches into a caption
    prompt = llama.render(rewrite_requests(CAPTIONS[:1])[0])
    assert llama.tokenizer.decode(list(first[0])) in prompt and "dog" not in llama.tokenizer.decode(list(first[0]))


def test_short_prefix_falls_back_to_plain_batches(llama):
    llama.share_prefix, llama._prefix = True, None
    reqs = [ChatRequest(messages=[{"role": "user", "content": c}], sampling=Sampling(max_new_tokens=4)) for c in CAPTIONS]
    out = llama.generate(reqs)
    assert llama._prefix is None and all(r.error is None for r in out)


def test_from_model_wraps_a_loaded_model(llama):
    wrapped = TransformersEngine.from_model(llama.net, llama.tokenizer, cfg=EngineConfig(model="in-memory-llama", batch_size="2"))
    assert wrapped.batch_size == 2 and wrapped.model == "in-memory-llama" and not wrapped.is_vision
    a = wrapped.generate(rewrite_requests(CAPTIONS[:2], max_new_tokens=5))
    llama._prefix = None
    b = llama.generate(rewrite_requests(CAPTIONS[:2], max_new_tokens=5))
    assert [r.text for r in a] == [r.text for r in b]


def test_pipeline_closes_the_caption_engine_before_loading_the_rewriter(tiny_models, samples_dir, tmp_path, monkeypatch):
    """One GPU holds one model at a time: close(caption) happens before load(rewrite)."""
    import dataprep.pipeline as pipeline
    from dataprep.caption import CaptionOptions
    from dataprep.rewrite import RewriteOptions
    from dataprep.sources import div2k
    from dataprep.store import CAPTIONS_SCHEMA, EDITS_SCHEMA, read_table

    events: list[str] = []
    real_load = pipeline.load_engine

    def load(cfg):
        events.append(f"load {Path(cfg.model).name}")
        engine = real_load(cfg)
        real_close = engine.close
        engine.close = lambda: (events.append(f"close {Path(cfg.model).name}"), real_close())
        return engine

    monkeypatch.setattr(pipeline, "load_engine", load)
    cfg = EngineConfig(device="cpu", batch_size="2")
    s = pipeline.run_pipeline(div2k(samples_dir), tmp_path, cfg, str(tiny_models / "llava"), str(tiny_models / "llama"),
                              CaptionOptions(max_new_tokens=6, workers=0), RewriteOptions(max_new_tokens=6, max_attempts=1), progress=False)
    assert events == ["load llava", "close llava", "load llama", "close llama"]
    assert s.caption.done == 2 and s.rewrite.done + s.rewrite.n_failed == 2
    caps = read_table(tmp_path / "captions", CAPTIONS_SCHEMA).to_pylist()
    edits = read_table(tmp_path / "edits", EDITS_SCHEMA).to_pylist()
    assert {r["image_id"] for r in caps} == {r["image_id"] for r in edits} == {"div2k/0001", "div2k/0002"}
    assert all(r["engine"] == "transformers" and r["model"] == str(tiny_models / "llama") for r in edits)


def test_pipeline_checks_every_flag_before_work(tiny_models, samples_dir, tmp_path):
    from dataprep.errors import ConfigError
    from dataprep.pipeline import run_pipeline
    from dataprep.rewrite import RewriteOptions
    from dataprep.sources import div2k

    with pytest.raises(ConfigError, match="--max-attempts"):
        run_pipeline(div2k(samples_dir), tmp_path, EngineConfig(device="cpu"), str(tiny_models / "llava"), str(tiny_models / "llama"), rewrite_opts=RewriteOptions(max_attempts=0), progress=False)
    with pytest.raises(ConfigError, match="--model"):
        run_pipeline(div2k(samples_dir), tmp_path, EngineConfig(device="cpu"), str(tiny_models / "llava"), "", progress=False)
    assert not (tmp_path / "captions").exists()  # nothing captioned before the rewrite flags were known good


def test_lone_request_reuses_but_never_replaces_the_shared_prefix(llama):
    llama.share_prefix, llama._prefix = True, None
    llama.generate(rewrite_requests(CAPTIONS[:1]))
    assert llama._prefix is None  # one request alone does not define a prefix common to a batch
    llama.generate(rewrite_requests(CAPTIONS[:3]))
    shared = llama._prefix
    lone = llama.generate(rewrite_requests(CAPTIONS[4:5]))
    assert llama._prefix is shared and lone[0].error is None


def test_prefill_runs_only_on_each_rows_own_tokens(llama, monkeypatch):
    """The point of the cache: generate's first forward sees the suffixes, not the shared prefix again."""
    llama.share_prefix, llama._prefix = True, None
    llama.generate(rewrite_requests(CAPTIONS[:2], max_new_tokens=2))  # builds the prefix cache
    n_prefix = len(llama._prefix[0])
    widths: list[int] = []
    real_forward = llama.net.forward

    def forward(*args, **kwargs):
        ids = kwargs.get("input_ids")
        widths.append(ids.shape[1] if ids is not None else -1)
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(llama.net, "forward", forward)
    reqs = rewrite_requests(CAPTIONS[2:4], max_new_tokens=3)
    full = max(len(llama.tokenizer(llama.render(r), add_special_tokens=False)["input_ids"]) for r in reqs)
    llama.generate(reqs)
    assert widths[0] == full - n_prefix  # prefill: own tokens only
    assert widths[1:] == [1, 1]  # then one token per step


def test_engine_leaves_autograd_enabled_for_the_rest_of_the_process(tiny_models):
    """A flow process captions, then trains: the engine must not switch grad off globally."""
    import torch

    from dataprep.engines import ChatRequest, EngineConfig, Sampling, load_engine

    engine = load_engine(EngineConfig(model=str(tiny_models / "llama")))
    engine.generate([ChatRequest(messages=[{"role": "user", "content": "hi"}], sampling=Sampling(max_new_tokens=2))])
    assert torch.is_grad_enabled()
    engine.close()


@pytest.mark.parametrize("device", ["gpu", "cuda0", "cuda:x"])
def test_bad_device_is_a_config_error_before_the_model_loads(device):
    """torch only refused a device like 'gpu' after from_pretrained had loaded the weights."""
    from dataprep.errors import ConfigError

    with pytest.raises(ConfigError) as exc:
        load_engine(EngineConfig(model="/nonexistent/never-loaded", device=device))
    assert exc.value.flag == "--device"


def test_device_forms_of_the_help_text_validate():
    for device in ("auto", "cpu", "cuda", "cuda:1", "mps"):
        EngineConfig(model="m", device=device)
