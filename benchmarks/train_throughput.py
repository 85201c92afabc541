"""Training throughput: kernorm's `train` against the study's PyTorch loop, side by side.

For each norm, both run two epochs of full MNIST with the study's set-up
(batch 128, SGD lr 0.01 momentum 0.9, L2 weight decay 1e-5 = kernorm's
--l2 5e-6, float32); the first epoch is the warm-up, the second is measured.
kernorm runs through its real command (`python -m kernorm train`), the peer
is `--peer` (default: shared/bench/torch_peer.py beside the repository, which
needs PyTorch); each in its own process. They alternate, kernorm then PyTorch,
`--pairs` times per norm, so that the host's drift hits both alike; each pair
gives one ratio. Both read the MNIST IDX files in `--data-dir` (default:
`KERNORM_DATA_DIR`).

    python benchmarks/train_throughput.py [--data-dir DIR] [--norms bn,ln,gn] [--pairs 3]

Prints one line per pair (images/s of both, their ratio kernorm / PyTorch),
then per norm the medians, and a last line `min_ratio=<smallest median ratio
over the norms>`.
"""

import argparse
import csv
import os
import re
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER = os.path.normpath(os.path.join(REPO, "..", "shared", "bench", "torch_peer.py"))
TRAIN_IMAGES = 60000


def run(command):
    """Runs `command`, returns what it printed; on failure shows its error output and stops."""
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{done.stderr[-3000:]}\nError: {' '.join(command)} failed (its error output is above)")
    return done.stdout


def kernorm_rate(norm, data_dir):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "run")
        run([sys.executable, "-m", "kernorm", "train", "--norm", norm, "--l2", "5e-6", "--epochs", "2",
             "--data-dir", data_dir, "--out", out])
        with open(os.path.join(out, "history.csv")) as f:
            return TRAIN_IMAGES / float(list(csv.DictReader(f))[1]["seconds"])


def peer_rate(peer, norm, data_dir):
    printed = run([sys.executable, peer, "--norm", norm, "--epochs", "2", "--data-dir", data_dir])
    return float(re.findall(r"^epoch \d+ train [\d.]+s \((\d+) img/s\)", printed, re.MULTILINE)[1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("KERNORM_DATA_DIR"),
                        help="folder with the four MNIST IDX files (default: $KERNORM_DATA_DIR)")
    parser.add_argument("--norms", default="bn,ln,gn", help="comma-separated norms")
    parser.add_argument("--peer", default=PEER, help="the PyTorch training script (default: %(default)s)")
    parser.add_argument("--pairs", type=int, default=3, help="alternating pairs per norm (default: %(default)s)")
    args = parser.parse_args()
    if not args.data_dir:
        sys.exit("Error: pass --data-dir DIR or set KERNORM_DATA_DIR: the PyTorch peer reads the MNIST IDX files")
    if not os.path.isdir(args.data_dir):
        sys.exit(f"Error: data directory {args.data_dir} does not exist; pass --data-dir with the MNIST IDX files")
    try:
        import torch  # noqa: F401  (only to say clearly that the peer cannot run)
    except ImportError:
        sys.exit("Error: PyTorch is not installed: pip install torch==2.13.0 (the CPU build) to run the peer")
    if not os.path.isfile(args.peer):
        sys.exit(f"Error: the peer script is missing: expected {args.peer}; pass --peer")

    print(f"{'norm':<6}{'pair':>6}{'kernorm img/s':>15}{'PyTorch img/s':>15}{'ratio':>8}")
    medians = {}
    for norm in args.norms.split(","):
        pairs = []
        for pair in range(1, args.pairs + 1):
            ours, peer = kernorm_rate(norm, args.data_dir), peer_rate(args.peer, norm, args.data_dir)
            pairs.append((ours, peer, ours / peer))
            print(f"{norm:<6}{pair:>6}{ours:>15,.0f}{peer:>15,.0f}{ours / peer:>8.2f}", flush=True)
        medians[norm] = [statistics.median(column) for column in zip(*pairs)]
    for norm, (ours, peer, ratio) in medians.items():
        print(f"{norm:<6}{'median':>6}{ours:>15,.0f}{peer:>15,.0f}{ratio:>8.2f}")
    print(f"min_ratio={min(ratio for _, _, ratio in medians.values()):.2f}")


if __name__ == "__main__":
    main()
