"""The block-wise calibration loop over any model family: the adapter contract, the schedule, capture of a
block's inputs, the LightningModule that walks the steps, statistics accumulation, placement, the per-step
anchor choice and the experts' targets. Lightning lives here and in callbacks/ only. The engine never imports
a family or a job: the job hands it an adapter, a solver and a targets provider."""
