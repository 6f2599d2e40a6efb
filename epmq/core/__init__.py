"""The maths, in pure torch: grids, GPTQ, layer statistics, E-PMQ's anchored relaxation, merges, RegMean,
the solvers. Nothing here knows Lightning, files or model families; it imports nothing of epmq outside core."""
