"""A data-parallel training step with clipfast.ClipLoss across ranks.

    torchrun --nproc_per_node=2 examples/distributed_clip.py --mode ring
    torchrun --nproc_per_node=8 examples/distributed_clip.py --mode gather --device cuda

Each rank encodes its own slice of a global batch with a shared linear
"encoder" wrapped in DistributedDataParallel; the loss is computed over the
whole global batch (every rank's images against every rank's texts). Prints
the loss and, on rank 0, checks the step's gradient against the
single-process loss on the gathered batch.

It runs one process per rank, started by torchrun (which sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT): run directly, it says
so and prints the torchrun command line (exit status 2), as it does for
--device cuda where CUDA or NCCL is missing.
"""

import argparse
import math
import os
import shlex
import sys

PROG = "examples/distributed_clip.py"
# What torchrun sets in each rank's environment (torch.distributed's env:// init reads them).
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["ring", "gather", "local"], default="ring",
                        help="ring (ClipLoss(ring=True)), gather (gather_with_grad=True) or local "
                             "(gather_with_grad=True, local_loss=True); default ring")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cpu (gloo) or cuda (NCCL, one GPU per rank); default cpu")
    parser.add_argument("--local-batch", type=int, default=64, help="rows per rank (default 64)")
    parser.add_argument("--dim", type=int, default=32, help="embedding dim (default 32)")
    args = parser.parse_args(argv)
    for name in ("local_batch", "dim"):
        if getattr(args, name) < 1:
            parser.error(f"argument --{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    return args


def launch_problem(argv) -> str:
    """Why this process cannot run as a rank ("" when it can): the message
    says how to launch it. Checked before torch is imported."""
    missing = [name for name in TORCHRUN_ENV if name not in os.environ]
    if not missing:
        return ""
    script = sys.argv[0] if sys.argv[0].endswith(".py") else PROG
    command = " ".join(["torchrun", "--nproc_per_node=2", shlex.quote(script), *map(shlex.quote, argv)])
    return (f"{', '.join(missing)} not set: this example runs one process per rank, started by "
            f"torchrun; launch it as: {command}")


def device_problem(device_type: str) -> str:
    """Why ``--device cuda`` cannot run here ("" when it can)."""
    if device_type != "cuda":
        return ""
    import torch
    import torch.distributed as dist

    if not torch.cuda.is_available():
        return (f"argument --device: cuda requested but CUDA is not available here (torch "
                f"{torch.__version__}, {torch.cuda.device_count()} GPUs visible); use --device cpu (gloo)")
    if not dist.is_nccl_available():
        return (f"argument --device: cuda needs NCCL, which this torch ({torch.__version__}) is built "
                "without; use --device cpu (gloo)")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if local_rank >= torch.cuda.device_count():
        return (f"argument --device: LOCAL_RANK {local_rank} but {torch.cuda.device_count()} GPUs are "
                "visible; start at most that many processes per node")
    return ""


def two_tower(d_in: int, d: int):
    """The shared linear "encoder": two towers and open_clip's logit scale."""
    import torch

    class TwoTower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.image = torch.nn.Linear(d_in, d, bias=False)
            self.text = torch.nn.Linear(d_in, d, bias=False)
            self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))

        def forward(self, images, texts):
            return self.image(images), self.text(texts), self.logit_scale.exp()

    return TwoTower()


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    problem = launch_problem(argv) or device_problem(args.device)
    if problem:
        print(f"{PROG}: error: {problem}", file=sys.stderr)
        return 2

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import clipfast

    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(args.device, int(os.environ.get("LOCAL_RANK", 0))) if args.device == "cuda" \
        else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # same model and global batch on every rank
    model = two_tower(16, args.dim).to(device)
    global_n = args.local_batch * world
    images = torch.randn(global_n, 16, device=device)
    texts = images + 0.5 * torch.randn(global_n, 16, device=device)
    rows = slice(rank * args.local_batch, (rank + 1) * args.local_batch)

    kwargs = dict(ring=dict(ring=True), gather=dict(gather_with_grad=True),
                  local=dict(gather_with_grad=True, local_loss=True))[args.mode]
    loss_fn = clipfast.ClipLoss(rank=rank, world_size=world, normalize=True, **kwargs)
    ddp = DistributedDataParallel(model)
    loss = loss_fn(*ddp(images[rows], texts[rows]))
    loss.backward()  # DDP averages the gradients over ranks

    if rank == 0:
        reference = two_tower(16, args.dim).to(device)
        reference.load_state_dict(model.state_dict())
        full = clipfast.clip_loss(*reference(images, texts), normalize=True, backend="chunked")
        full.backward()
        err = max((p.grad - q.grad).abs().max().item()
                  for p, q in zip(model.parameters(), reference.parameters()))
        print(f"world {world}, mode {args.mode}: loss {loss.item():.6f} "
              f"(single process {full.item():.6f}), max gradient difference {err:.2e}")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
