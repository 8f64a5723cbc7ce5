"""Offline evaluation of policy versions: ``catq eval`` scoring, results and plots."""
