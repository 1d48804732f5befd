"""The V-cycle: recipe configs, the stage plan with its sizing, and the run that executes it."""
