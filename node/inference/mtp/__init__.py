"""Native MTP: speculative decoding with the checkpoint's own multi-token-prediction head
(Qwen3.5/3.6): the head, its weights' recovery, the verify forward, the K policy and its costs."""
