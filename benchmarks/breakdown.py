"""Where a HAT train step's extra time goes, measured beside the speed benchmark's models.

    python benchmarks/breakdown.py

1 thread, the models of ``benchmarks/overhead.py`` (the CNN, and hat_resnet18s with its plain
twin), each training task 1 with task 0 protected. Prints

- the CNN train step (fused AdamW) against plain torch with and without HAT's mask regularizer
  (``get_hat_reg_term``, which a HAT training loop adds to its loss);
- the time of the two optimizer step hooks (gradient conditioning, snapshot, exact restore);
- with torch's default AdamW: the share of Adam's ``exp_avg_sq`` that is exactly 0, and what
  ``sqrt`` of the whole state costs for the HAT model and for the plain one (the default AdamW
  takes it every step; see ``benchmarks/sqrt_zeros.py``).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from overhead import HATCNN, PlainCNN, adamw, copy_weights, paired, steady_allocator
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from hat import HATConfig, HATPayload
from hat._runtime import RUNTIME
from hat.protect import hooks as _protect
from hat.utils import get_hat_reg_term


def timed_hooks() -> dict[str, list[float]]:
    """Replace hat's optimizer step hooks by timed copies of themselves."""
    times: dict[str, list[float]] = {"pre": [], "post": []}

    def wrap(fn, name):
        def hook(optimizer, *args):
            protecting = optimizer in RUNTIME.pending  # before the post-step hook pops it
            t0 = time.perf_counter()
            fn(optimizer, *args)
            if optimizer in RUNTIME.pending or protecting:  # a HAT model's optimizer, not the plain one's
                times[name].append(time.perf_counter() - t0)
        return hook

    for handle in _protect._HANDLES:
        handle.remove()
    _protect._HANDLES[:] = [register_optimizer_step_pre_hook(wrap(_protect._pre_step, "pre")),
                            register_optimizer_step_post_hook(wrap(_protect._post_step, "post"))]
    return times


def sqrt_cost(optimizer: torch.optim.Optimizer) -> tuple[float, float]:
    """(share of exp_avg_sq exactly 0, median ms of sqrt over all of it)."""
    states = [s["exp_avg_sq"] for s in optimizer.state.values() if "exp_avg_sq" in s]
    zeros = sum(int((v == 0).sum()) for v in states) / sum(v.numel() for v in states)
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        for v in states:
            v.sqrt()
        times.append(time.perf_counter() - t0)
    return zeros, statistics.median(times) * 1e3


def cnn(repeats: int, hooks: dict[str, list[float]]) -> None:
    torch.manual_seed(0)
    plain, hat_model = PlainCNN(), HATCNN(HATConfig(num_tasks=5))
    copy_weights(plain, hat_model)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    for fused in (True, False):
        opt_plain, opt_hat = adamw(plain.parameters(), fused), adamw(hat_model.parameters(), fused)

        def step_hat(task: int = 1, reg: bool = False, opt_hat=opt_hat) -> None:
            loss = F.cross_entropy(hat_model(HATPayload(x, task_id=task, mask_scale=50.0)).data, y)
            if reg:
                loss = loss + 0.75 * get_hat_reg_term(hat_model, task_id=task, mask_scale=50.0)
            opt_hat.zero_grad()
            loss.backward()
            opt_hat.step()

        def step_plain(opt_plain=opt_plain) -> None:
            loss = F.cross_entropy(plain(x), y)
            opt_plain.zero_grad()
            loss.backward()
            opt_plain.step()

        for _ in range(20):
            step_hat(0)
            step_plain()
        if fused:
            without = paired(step_hat, step_plain, repeats, 10)
            hooks["pre"].clear()
            hooks["post"].clear()
            with_reg = paired(lambda: step_hat(reg=True), step_plain, repeats, 10)
            print(f"CNN train step, fused AdamW, HAT / plain: {without:.3f}x without the regularizer, "
                  f"{with_reg:.3f}x with it ({repeats} pairs each)")
            print(f"CNN optimizer step hooks: {statistics.median(hooks['pre']) * 1e3:.2f} ms before the step, "
                  f"{statistics.median(hooks['post']) * 1e3:.2f} ms after")
        else:
            for _ in range(10):
                step_hat()
                step_plain()
            report("CNN", opt_hat, opt_plain)


def resnet(hooks: dict[str, list[float]]) -> None:
    import timm

    import hat.timm_models  # registers hat_resnet18s; binds hat

    torch.manual_seed(0)
    model = timm.create_model("hat_resnet18s", hat_config=HATConfig(num_tasks=5), num_classes=10)
    plain = hat.unconvert(model, None)
    opt_hat, opt_plain = adamw(model.parameters(), False), adamw(plain.parameters(), False)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    for step in range(15):
        hat.set_task(model, 0 if step < 5 else 1, mask_scale=50.0)
        for m, opt in ((model, opt_hat), (plain, opt_plain)):
            loss = F.cross_entropy(m(x), y)
            opt.zero_grad()
            loss.backward()
            if step == 5:
                hooks["pre"].clear()
                hooks["post"].clear()
            opt.step()
    print(f"hat_resnet18s optimizer step hooks: {statistics.median(hooks['pre']) * 1e3:.1f} ms before the step, "
          f"{statistics.median(hooks['post']) * 1e3:.1f} ms after")
    report("hat_resnet18s", opt_hat, opt_plain)


def report(name: str, opt_hat: torch.optim.Optimizer, opt_plain: torch.optim.Optimizer) -> None:
    zeros_hat, ms_hat = sqrt_cost(opt_hat)
    zeros_plain, ms_plain = sqrt_cost(opt_plain)
    print(f"{name}, default AdamW: exp_avg_sq exactly 0: {100 * zeros_hat:.0f}% (plain {100 * zeros_plain:.0f}%); "
          f"sqrt of it all {ms_hat:.1f} ms (plain {ms_plain:.1f} ms)")


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=100, help="timed pairs per CNN ratio")
    parser.add_argument("--skip-timm", action="store_true")
    args = parser.parse_args()
    print(f"1 thread, allocator: {steady_allocator()}")
    torch.set_num_threads(1)
    hooks = timed_hooks()
    cnn(args.repeats, hooks)
    if not args.skip_timm:
        resnet(hooks)


if __name__ == "__main__":
    main()
