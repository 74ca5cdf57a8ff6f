"""What makes a run faster without changing its result: the frozen-feature cache and its persistent store,
feature extraction by shard, the CPU bf16 depthwise backward."""
