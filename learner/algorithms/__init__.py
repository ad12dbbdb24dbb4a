"""One algorithm per file, each loss a pure function of tensors: crd (primary), nft, grpo."""
