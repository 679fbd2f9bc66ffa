"""Learned losses for reinforcement learning.

``envs``: the MuJoCo reacher and the point mass; ``dynamics``: the learned
dynamics ensemble; ``reacher``: the model-based reacher experiment;
``goal_reaching``: model-free goal reaching with Gaussian policies. The
pipeline's RL stages depend on this folder as a whole (``dvc.yaml``).
"""
