"""A data-parallel training step with clipfast.ClipLoss across ranks.

    torchrun --nproc_per_node=2 examples/distributed_clip.py --mode ring
    torchrun --nproc_per_node=8 examples/distributed_clip.py --mode gather --device cuda

Each rank encodes its own slice of a global batch with a shared linear
"encoder" wrapped in DistributedDataParallel; the loss is computed over the
whole global batch (every rank's images against every rank's texts). Prints
the loss and, on rank 0, checks the step's gradient against the
single-process loss on the gathered batch.
"""

import argparse
import math
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import clipfast


class TwoTower(torch.nn.Module):
    def __init__(self, d_in: int, d: int):
        super().__init__()
        self.image = torch.nn.Linear(d_in, d, bias=False)
        self.text = torch.nn.Linear(d_in, d, bias=False)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, images, texts):
        return self.image(images), self.text(texts), self.logit_scale.exp()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["ring", "gather", "local"], default="ring")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--local-batch", type=int, default=64)
    parser.add_argument("--dim", type=int, default=32)
    args = parser.parse_args()

    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(args.device, int(os.environ.get("LOCAL_RANK", 0))) if args.device == "cuda" \
        else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # same model and global batch on every rank
    model = TwoTower(16, args.dim).to(device)
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
        reference = TwoTower(16, args.dim).to(device)
        reference.load_state_dict(model.state_dict())
        full = clipfast.clip_loss(*reference(images, texts), normalize=True, backend="chunked")
        full.backward()
        err = max((p.grad - q.grad).abs().max().item()
                  for p, q in zip(model.parameters(), reference.parameters()))
        print(f"world {world}, mode {args.mode}: loss {loss.item():.6f} "
              f"(single process {full.item():.6f}), max gradient difference {err:.2e}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
