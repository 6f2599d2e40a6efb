"""What is read and written: weight files and the expert pool, the hub, packed codes, the GPTQ checkpoint
(export and load), the step store that resuming reads, fingerprints, atomic files. No calibration loop and
no job lives here; io imports core and nothing else of epmq."""
