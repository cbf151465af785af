"""One SoftREPA training step on SD3 vs one full fine-tuning step of the same shape.

Random weights with the real SD3-medium transformer shape (24 MM-DiT blocks,
width 1536, 2B parameters), 512 x 512 images (the official trainer's size;
``--resolution 1024`` for SD3's native one) = latents 16 x 64 x 64, a
4 x 4 grid (4 images x 4 prompts = 16 denoiser rows, paper Table 3), text
stream 77 CLIP + 512 T5 positions. Both modes run the same forward and loss
(contrastive score matching, one timestep and one noise per grid):

- ``tokens``: frozen bf16 transformer, fp32 soft tokens (4 x 5 layers,
  t-dependent) through ``softrepa.tokens.wrap_model``; AdamW on the tokens;
- ``full``: every transformer weight trains (fp32 master weights, bf16
  autocast, AdamW), the usual mixed-precision fine-tuning set-up.

Reports per mode: median step time over ``--steps`` timed steps after one
warm-up step, peak allocated memory, trainable parameters; a mode that runs
out of memory reports ``"error": "out of memory"`` instead. Prints JSON,
asserts nothing. Imports torch, diffusers and softrepa's torch-only
``tokens``/``loss`` modules (the code path the trainer runs), nothing else.

    python bench/gpu_train_step.py                       # H100: real shape
    python bench/gpu_train_step.py --gradient-checkpointing
    python bench/gpu_train_step.py --tiny                # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
TINY = dict(sample_size=16, patch_size=1, in_channels=4, num_layers=4, attention_head_dim=8, num_attention_heads=4,
            joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=64, out_channels=4,
            pos_embed_max_size=32)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_mode(mode: str, args: argparse.Namespace, device: torch.device) -> dict:
    from diffusers import SD3Transformer2DModel

    from softrepa.backbone import T5_MAX_LENGTH
    from softrepa.loss import error_matrix, softrepa_loss
    from softrepa.tokens import SoftTokens, TokenConfig, wrap_model

    cfg = TINY if args.tiny else SD3_MEDIUM
    latent = 16 if args.tiny else args.resolution // 8
    text_len = 12 if args.tiny else 77 + T5_MAX_LENGTH  # CLIP + T5 tokens, as the trainer encodes prompts
    cuda = device.type == "cuda"
    low = torch.bfloat16 if cuda else torch.float32
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**cfg)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if mode == "tokens":
        model.requires_grad_(False)
        model.to(device, low)  # frozen: stored in bf16, as the trainer loads it
        tokens = SoftTokens(TokenConfig.preset("sd3", model)).to(device)
        net = wrap_model(model, tokens)
        params = list(tokens.parameters())
    else:
        model.to(device)  # fp32 master weights, bf16 autocast
        net = model
        params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
    n_img, n_prm = args.images, args.prompts
    rows = n_img * n_prm
    g = torch.Generator(device="cpu").manual_seed(0)
    latents = torch.randn(n_img, cfg["in_channels"], latent, latent, generator=g).to(device)
    noise = torch.randn(1, cfg["in_channels"], latent, latent, generator=g).to(device)
    text = torch.randn(n_prm, text_len, cfg["joint_attention_dim"], generator=g).to(device, low)
    pooled = torch.randn(n_prm, cfg["pooled_projection_dim"], generator=g).to(device, low)
    pos = torch.arange(n_img, device=device)

    def step() -> float:
        t = 500
        sigma = t / 1000
        zt = ((1 - sigma) * latents + sigma * noise).repeat(n_prm, 1, 1, 1)  # [P*B, C, h, w]
        target = noise - latents
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            pred = net(hidden_states=zt.to(low), encoder_hidden_states=text.repeat_interleave(n_img, 0),
                       pooled_projections=pooled.repeat_interleave(n_img, 0),
                       timestep=torch.full((rows,), float(t), device=device), return_dict=False)[0]
        loss = softrepa_loss(error_matrix(pred, target, n_img, n_prm), pos).loss
        loss.backward()
        opt.step()
        return float(loss.detach())

    result = {"mode": mode, "trainable_params": sum(p.numel() for p in params),
              "frozen_params": sum(p.numel() for p in model.parameters()) - (sum(p.numel() for p in params) if mode == "full" else 0)}
    try:
        step()  # warm-up: kernels, allocator, optimizer state
        _sync(device)
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            loss = step()
            _sync(device)
            times.append(time.perf_counter() - t0)
        result.update(step_s_median=statistics.median(times), step_s_all=times, loss=loss)
    except torch.OutOfMemoryError:
        result["error"] = "out of memory"
    if cuda:
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del opt, net, model
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny transformer on CPU: a smoke test of this script")
    ap.add_argument("--modes", default="tokens,full", help="comma-separated: tokens, full")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per mode (after one warm-up step)")
    ap.add_argument("--images", type=int, default=4, help="images per grid (B)")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per grid (P)")
    ap.add_argument("--resolution", type=int, default=512, help="image size; latents are resolution / 8 (the trainer's default, as the official one, is 512)")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="recompute blocks in backward (both modes)")
    args = ap.parse_args()
    if args.tiny:
        torch.set_num_threads(1)
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --tiny for the CPU smoke test")
        device = torch.device("cuda")
    import diffusers

    report = {
        "bench": "gpu_train_step",
        "shape": "tiny" if args.tiny else "sd3-medium",
        "grid": f"{args.images}x{args.prompts}",
        "resolution": None if args.tiny else args.resolution,
        "gradient_checkpointing": args.gradient_checkpointing,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "results": [run_mode(m.strip(), args, device) for m in args.modes.split(",") if m.strip()],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
