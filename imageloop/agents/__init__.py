"""Model-backed roles that reason (critic, rewriter, captioner) and the VLM backends they run on."""
