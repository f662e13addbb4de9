"""gptkit: the code the scripts at the repository root share."""
