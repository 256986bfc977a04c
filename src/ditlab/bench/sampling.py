"""``python -m ditlab.bench sampling``: images/s of every sampler through ``ditlab.inference.generate``."""

from __future__ import annotations

import time

import torch
from hydra.utils import instantiate

from ditlab.bench.common import CountingModel, hardware
from ditlab.bench.train import model_spec
from ditlab.diffusion import FlowMatching, Guidance, Sampler, create_diffusion
from ditlab.inference import generate
from ditlab.models.dit import DiT


def _bench_dit(args, learn_sigma: bool = True):
    """The benchmarked DiT: 4-channel latents of ``args.size``, patch 2, 4 heads, 10 classes."""
    return DiT(
        input_size=args.size,
        patch_size=2,
        in_channels=4,
        hidden_size=args.hidden,
        depth=args.depth,
        num_heads=4,
        num_classes=10,
        learn_sigma=learn_sigma,
    )


# ------------------------------------------------------------------------------------------ sampling
ALL_SAMPLERS = "ddpm:250,ddpm:50,ddim:50,dpmpp_2m:20,unipc:20,ode_euler:50,ode_heun:25,flow_euler:50,flow_heun:25"


def _sampling_net(args, learn_sigma: bool):
    """``--model`` (any model config, e.g. dit_xl2) at ``--size``, else the small ``--hidden``/``--depth`` DiT."""
    if not args.model:
        return _bench_dit(args, learn_sigma)
    return instantiate({**model_spec(args.model, args.size), "learn_sigma": learn_sigma})


def bench_sampling(args) -> None:
    """Seconds per image of each sampler through ``ditlab.inference.generate``, what ``ditlab.sample``
    and the FID callback run (per-sample noise streams, guidance batched, bf16 autocast on CUDA),
    latents out (no VAE decode). The reference is the first sampler listed (default DDPM-250)."""
    device = torch.device(args.device)
    chosen = []
    for item in args.samplers.split(","):
        name, _, steps = item.partition(":")
        chosen.append(Sampler(name, int(steps)))  # an unknown name or bad steps: one line, before any work
    torch.manual_seed(0)
    results = []
    for objective in (create_diffusion(), FlowMatching()):
        samplers = [s for s in chosen if isinstance(objective, s.spec.objective)]
        if not samplers:
            continue
        learn_sigma = not isinstance(objective, FlowMatching)
        net = _sampling_net(args, learn_sigma).to(device).eval()
        with torch.no_grad():  # non-zero outputs so that every sampler does real work
            for p in net.final_layer.parameters():
                p.normal_(0, 0.02)
        counted = CountingModel(net)
        labels = torch.arange(args.batch) % net.num_classes
        kwargs = dict(
            latent_shape=(net.in_channels, net.input_size, net.input_size),
            null_label=net.num_classes,
            guidance=Guidance(args.cfg_scale),
            batch_size=args.batch,
            device=device,
        )
        for sampler in samplers:
            # A 2-step warm-up of this sampler first: its lazy imports (diffusers' schedulers) and
            # first-call costs are paid once per process, not per batch.
            generate(counted, objective, Sampler(sampler.name, 2), labels, torch.arange(args.batch), **kwargs)
            counted.calls = 0
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            generate(counted, objective, sampler, labels, torch.arange(args.batch), **kwargs)  # synchronizes (.cpu())
            seconds = time.perf_counter() - start
            results.append((type(objective).__name__, sampler.name, sampler.steps, counted.calls, seconds / args.batch))
    what = args.model or f"DiT hidden {args.hidden} depth {args.depth}"
    print(
        f"# sampling: {what} on {args.size}x{args.size} latents, batch {args.batch}, cfg {args.cfg_scale} "
        f"(through generate: {'bf16 autocast' if device.type == 'cuda' else 'fp32'}); {hardware()}"
    )
    print(f"{'objective':<18}{'sampler':<12}{'steps':>6}{'NFE':>6}{'s/image':>10}{'img/s':>10}{'vs first':>10}")
    reference = results[0][4]
    for objective_name, name, steps, nfe, spi in results:
        print(f"{objective_name:<18}{name:<12}{steps:>6}{nfe:>6}{spi:>10.4f}{1 / spi:>10.2f}{reference / spi:>9.1f}x")
