import sys

print("usage: python -m hpc.homogenize | hpc.compare | hpc.batch | hpc.train | hpc.evaluate  (see --help of each)",
      file=sys.stderr)
sys.exit(2)
