"""Helpers every stage shares: safe file writes (`files`), progress and log lines
(`progress`), and pictures — image grids and plots (`pictures`)."""
