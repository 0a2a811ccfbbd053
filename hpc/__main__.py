import sys

print("usage: python -m hpc.homogenize | hpc.compare | hpc.batch | hpc.make_dataset | hpc.train | hpc.evaluate | hpc.export_model  (see --help of each)",
      file=sys.stderr)
sys.exit(2)
