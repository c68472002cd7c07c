"""Several gloo processes on this machine, for the DistributedDataParallel tests (one thread each)."""
import socket

import torch


def _run(rank: int, world: int, port: int, worker, args: tuple) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        worker(rank, world, *args)
        # both ranks reach teardown together: a rank that destroys its gloo group while the other still writes
        # a checkpoint can abort ("terminate called without an active exception"), seen once in CI
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(worker, world: int, *args) -> None:
    """Runs ``worker(rank, world, *args)`` in ``world`` processes joined in one gloo group (a module-level
    function: spawn pickles it by name); returns when all have finished, raising a worker's error."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_run, args=(world, port, worker, args), nprocs=world, join=True)
