"""Evaluations of trained policies: preference metrics, implicit-reward scores, the reward-KL frontier."""
