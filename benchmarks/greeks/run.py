"""Greeks engine throughput: compute_greeks against vollib's scalar loop (Let's Be Rational).

IV + delta, gamma, theta, vega, rho on realistic NIFTY inputs (spot 24000, strikes
20000..28000 step 50, expiries 1..60 days, premia rounded to 0.05), measured side by side in
one run on one core. Run from the repository root:

    uv run python benchmarks/greeks/run.py [--rounds 7] [--vollib-sample 3000]
"""

from __future__ import annotations

import os

# One core: numba must not start a thread pool (the kernel is serial anyway), and the process
# is pinned to one CPU below.
os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import argparse
import math
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from scipy.special import ndtr

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from vollib.black.greeks import analytical as vollib_greeks  # noqa: E402
from vollib.black.implied_volatility import implied_volatility as vollib_iv  # noqa: E402
from vollib.lets_be_rational import PriceIsAboveMaximum, PriceIsBelowIntrinsic  # noqa: E402

from streaming.greeks import black76_price, compute_greeks  # noqa: E402

SPOT = 24_000.0
RATE = 0.065
TICK = 0.05
BATCH_SIZES = (10_000, 100_000, 1_000_000)
SUBSCRIPTION_SIZE = 9_000


def nifty_chain(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Every (expiry, strike) of a 60-day NIFTY chain, call and put side by side, pairs shuffled.

    Forward S e^{rT}; a skewed smile (13 % ATM); premia rounded to the 0.05 tick, so deep OTM
    options quote 0 or one tick as on NSE.
    """
    strikes = np.arange(20_000.0, 28_001.0, 50.0)
    days = np.arange(1, 61, dtype=np.float64)
    k, d = (a.ravel() for a in np.meshgrid(strikes, days))
    order = rng.permutation(k.size)
    k, d = np.repeat(k[order], 2), np.repeat(d[order], 2)
    is_call = np.tile([True, False], k.size // 2)
    t = d / 365.0
    forward = SPOT * np.exp(RATE * t)
    m = np.log(k / forward)
    sigma = 0.13 - 0.25 * m + 1.2 * m * m

    def quote(c):
        p = black76_price(forward=forward, strike=k, t_years=t, sigma=sigma, r=RATE, is_call=c)
        return np.round(p / TICK) * TICK

    price = quote(is_call)
    return {
        "price": price,
        "pair_price": quote(~is_call),
        "forward": forward,
        "strike": k,
        "t_years": t,
        "is_call": is_call,
    }


def take(chain: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """The first n options of the chain repeated (call/put pairs stay side by side)."""
    idx = np.arange(n) % chain["price"].size
    return {name: np.ascontiguousarray(a[idx]) for name, a in chain.items()}


def ours(batch: dict[str, np.ndarray], *, pairs: bool):
    args = dict(batch)
    if not pairs:
        args.pop("pair_price")
    return compute_greeks(r=RATE, **args)


def timed(fn, rounds: int) -> tuple[float, float, float]:
    """(best wall s, median wall s, best CPU s) over rounds."""
    walls, cpus = [], []
    for _ in range(rounds):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return min(walls), statistics.median(walls), min(cpus)


def vollib_loop(batch: dict[str, np.ndarray]) -> np.ndarray:
    """vollib's scalar loop: IV then the five Greeks, one option at a time, on its own price."""
    out = np.full((batch["price"].size, 6), np.nan)
    # vollib warns on premia of 0 (it returns an IV of 0 for them); the loop still times them.
    warnings.simplefilter("ignore", RuntimeWarning)
    rows = zip(
        batch["price"].tolist(), batch["forward"].tolist(), batch["strike"].tolist(),
        batch["t_years"].tolist(), batch["is_call"].tolist(), strict=True,
    )  # fmt: skip
    for i, (p, f, k, t, c) in enumerate(rows):
        flag = "c" if c else "p"
        try:
            iv = vollib_iv(p, f, k, RATE, t, flag)
        except (PriceIsBelowIntrinsic, PriceIsAboveMaximum):
            continue
        out[i] = (
            iv,
            vollib_greeks.delta(flag, f, k, t, RATE, iv),
            vollib_greeks.gamma(flag, f, k, t, RATE, iv),
            vollib_greeks.theta(flag, f, k, t, RATE, iv),
            vollib_greeks.vega(flag, f, k, t, RATE, iv),
            vollib_greeks.rho(flag, f, k, t, RATE, iv),
        )
    return out


def numpy_newton(batch: dict[str, np.ndarray], iterations: int = 20):
    """The vectorised numpy Newton a numba-free engine would use: what numba is measured against.

    Solved on the OTM side (ITM premia less discounted intrinsic) from the Manaster-Koehler
    start sqrt(2 |ln(F/K)| / T), which makes Newton on the premium monotone, with plain Newton
    steps; then the Greeks. Every step is a whole-array numpy expression.
    """
    p, f, k, t, c = (batch[n] for n in ("price", "forward", "strike", "t_years", "is_call"))
    disc = np.exp(-RATE * t)
    sqrt_t = np.sqrt(t)
    log_fk = np.log(f / k)
    otm_sign = np.where(log_fk > 0.0, -1.0, 1.0)  # solve the OTM put above the forward
    otm = p - disc * np.maximum(np.where(c, 1.0, -1.0) * (f - k), 0.0)
    start = np.sqrt(2.0 * np.abs(log_fk) / t)
    sigma = np.where(start > 0.0, start, np.sqrt(2.0 * np.pi / t) * otm / (disc * f))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for _ in range(iterations):
            d1 = log_fk / (sigma * sqrt_t) + 0.5 * sigma * sqrt_t
            d2 = d1 - sigma * sqrt_t
            model = disc * otm_sign * (f * ndtr(otm_sign * d1) - k * ndtr(otm_sign * d2))
            vega = disc * f * np.exp(-0.5 * d1 * d1) / math.sqrt(2 * math.pi) * sqrt_t
            sigma = np.clip(sigma - (model - otm) / vega, 1e-4, 10.0)
    sign = np.where(c, 1.0, -1.0)
    d1 = log_fk / (sigma * sqrt_t) + 0.5 * sigma * sqrt_t
    density = np.exp(-0.5 * d1 * d1) / math.sqrt(2 * math.pi)
    delta = sign * disc * ndtr(sign * d1)
    gamma = disc * density / (f * sigma * sqrt_t)
    vega = disc * f * density * sqrt_t / 100
    theta = (RATE * p - disc * f * density * sigma / (2 * sqrt_t)) / 365
    rho = -t * p / 100
    return sigma, delta, gamma, theta, vega, rho


JIT_DISABLED_SNIPPET = """
import sys, time, numpy as np
sys.path.insert(0, {root!r})
from streaming.greeks import compute_greeks
data = np.load({path!r})
args = {{name: data[name] for name in data.files}}
t0 = time.process_time()
compute_greeks(r={rate}, **args)
print(args["price"].size / (time.process_time() - t0))
"""


def jit_disabled_rate(batch: dict[str, np.ndarray], tmp: Path) -> float:
    """The same engine code run by CPython with NUMBA_DISABLE_JIT=1, options/s (CPU time)."""
    path = tmp / "greeks_bench_sample.npz"
    np.savez(path, **batch)
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    code = JIT_DISABLED_SNIPPET.format(root=str(ROOT), path=str(path), rate=RATE)
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return float(done.stdout.strip().splitlines()[-1])


def pin_to_one_cpu() -> str:
    if not hasattr(os, "sched_setaffinity"):
        return "not pinned (no sched_setaffinity)"
    cpu = max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return f"pinned to CPU {cpu}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="timed repetitions per figure")
    parser.add_argument("--vollib-sample", type=int, default=3000, help="options for vollib")
    args = parser.parse_args()

    pinned = pin_to_one_cpu()
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    print(f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"{pinned}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")  # fmt: skip

    rng = np.random.default_rng(20_24)
    chain = nifty_chain(rng)
    print(f"chain: {chain['price'].size} options, {np.mean(chain['price'] <= 0):.1%} quoted at 0")

    w0 = time.perf_counter()
    ours(take(chain, 100), pairs=True)
    print(f"first call (numba compile or cache load): {time.perf_counter() - w0:.2f} s")

    # vollib's scalar loop, on a sample of the same chain.
    sample = take(chain, args.vollib_sample)
    w0, c0 = time.perf_counter(), time.process_time()
    ref = vollib_loop(sample)
    vollib_wall, vollib_cpu = time.perf_counter() - w0, time.process_time() - c0
    vollib_rate = sample["price"].size / vollib_cpu
    print(f"vollib scalar loop: {sample['price'].size} options, "
          f"{sample['price'].size / vollib_wall:,.0f} options/s wall, "
          f"{vollib_rate:,.0f} options/s CPU")  # fmt: skip

    mine = ours(sample, pairs=False)
    both = np.isfinite(ref[:, 0]) & np.isfinite(mine.iv)
    print(f"agreement on that sample (own prices, no vega floor applied by vollib): "
          f"max |dIV| = {np.max(np.abs(mine.iv[both] - ref[both, 0])):.1e} over {both.sum()} "
          f"options both solve")  # fmt: skip

    print()
    print("ours, compute_greeks (IV + 5 Greeks + flags), best of "
          f"{args.rounds}; ratio = ours / vollib (CPU options/s)")
    header = f"{'mode':<6}{'batch':>10}{'wall ms':>11}{'wall Mopt/s':>13}{'CPU Mopt/s':>12}"
    print(header + f"{'x vollib':>10}")
    for pairs, mode in ((True, "pair"), (False, "own")):
        for n in BATCH_SIZES:
            batch = take(chain, n)
            best_wall, _, best_cpu = timed(lambda b=batch, p=pairs: ours(b, pairs=p), args.rounds)
            ratio = (n / best_cpu) / vollib_rate
            print(f"{mode:<6}{n:>10,}{best_wall * 1e3:>11.2f}{n / best_wall / 1e6:>13.2f}"
                  f"{n / best_cpu / 1e6:>12.2f}{ratio:>10.0f}")  # fmt: skip
    print("  pair: live path, ITM options take their OTM pair's IV (one solve per strike)")
    print("  own:  every option solved on its own price (what vollib's loop does)")

    print()
    idx = rng.choice(chain["price"].size // 2, SUBSCRIPTION_SIZE // 2, replace=False)
    idx = np.stack([2 * idx, 2 * idx + 1], axis=1).ravel()
    subscription = {name: np.ascontiguousarray(a[idx]) for name, a in chain.items()}
    for pairs, mode in ((True, "pair"), (False, "own")):
        best, median, _ = timed(lambda p=pairs: ours(subscription, pairs=p), 50)
        print(f"{SUBSCRIPTION_SIZE}-option subscription ({mode}): best {best * 1e3:.2f} ms, "
              f"median {median * 1e3:.2f} ms (target < 5 ms)")  # fmt: skip

    print()
    print("what numba bought (same 100k batch, own prices):")
    batch = take(chain, 100_000)
    mine = ours(batch, pairs=False)
    ok = np.isfinite(mine.iv)
    for steps in (8, 20):
        _, _, best_cpu = timed(lambda st=steps: numpy_newton(batch, st), max(3, args.rounds // 2))
        err = np.abs(numpy_newton(batch, steps)[0][ok] - mine.iv[ok])
        print(f"  vectorised numpy Newton, Manaster-Koehler start, {steps} steps: "
              f"{100_000 / best_cpu / 1e6:.2f} M options/s CPU, |dIV| > 1e-9 on "
              f"{np.mean(err > 1e-9):.1%} of options we solve (max {err.max():.1g})")  # fmt: skip
    tiny = take(chain, 100_000)
    tiny["price"] = np.exp(rng.uniform(np.log(1e-5), np.log(1e-3), 100_000))
    tiny["is_call"] = tiny["strike"] >= tiny["forward"]  # OTM: a tiny premium has an IV
    tiny.pop("pair_price")
    tiny_ours = compute_greeks(r=RATE, min_vega_per_point=0.0, **tiny)
    solved = np.isfinite(tiny_ours.iv)
    err = np.abs(numpy_newton(tiny, 20)[0][solved] - tiny_ours.iv[solved])
    print(f"  premia below 0.001 (same strikes and expiries, {solved.sum():,} solvable): numpy "
          f"Newton (20 steps) off by > 1e-9 on {np.mean(err > 1e-9):.0%}, by > 1 vol point "
          f"on {np.mean(err > 0.01):.0%}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        jit_off = jit_disabled_rate(take(chain, 2000), Path(tmp))
    print(f"  the same engine code without numba (NUMBA_DISABLE_JIT=1): "
          f"{jit_off:,.0f} options/s CPU")  # fmt: skip


if __name__ == "__main__":
    main()
