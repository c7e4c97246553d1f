"""Data parallelism over torch.distributed: one gradserve server made of a torchrun group.

Rank 0 serves gRPC and drives; every other rank follows the command stream rank 0 broadcasts
and runs the same core ops on its replica of every model (core/parallel.py is the interface).

- launch.py: torchrun's environment -> each rank's device, the process group, the hello
- group.py: the process groups, the command header, collectives with timeouts, liveness
- comm.py: the collectives core's ops call (Parallel's), shared by both roles
- driver.py: rank 0's Parallel: one command stream, sequence numbers, heartbeats, failures
- follower.py: the other ranks' loop
"""
