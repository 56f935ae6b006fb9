"""Two real processes (gloo on 127.0.0.1): each loader takes rank and world size from torch.distributed."""

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gpuload import GPULoader

STEPS, B, T = 4, 3, 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank, world_size, port, paths, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        ld = GPULoader(paths, batch_size=B, seq_len=T, sampling="shuffle", seed=5, device="cpu")
        assert (ld.rank, ld.world_size) == (rank, world_size)
        xs = torch.stack([next(ld)[0] for _ in range(STEPS)])
        gathered = [torch.empty_like(xs) for _ in range(world_size)]
        dist.all_gather(gathered, xs)  # the ranks must agree on the whole global batch
        if rank == 0:
            torch.save(torch.cat(gathered, dim=1), f"{out_dir}/global.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_gloo(make_shards, tmp_path):
    paths = make_shards([3000, 2000])
    mp.start_processes(worker, args=(2, free_port(), paths, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    got = torch.load(tmp_path / "global.pt")
    single = GPULoader(paths, batch_size=2 * B, seq_len=T, sampling="shuffle", seed=5, rank=0, world_size=1, device="cpu")
    expected = torch.stack([next(single)[0] for _ in range(STEPS)])
    assert got.shape == (STEPS, 2 * B, T)
    assert torch.equal(got, expected)
