"""The Q-Former and its stage-1 / stage-2 objectives: attention masks, losses, models."""
