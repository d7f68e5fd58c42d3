"""What a config costs, read off the model definition with nothing allocated: parameters
(parameters.py), and memory, devices and expert-parallel traffic on a mesh (planner.py)."""
