"""The simulated world: catalogue, requests, user-response model, policies, drift, real lists.

    from dualrerank.sim import World, WorldConfig
    world = World(WorldConfig(), seed=0)
    state, batch = world.sample_requests(256, 1)

See docs/simulator.md for the model and its calibration.
"""

from dualrerank.sim.config import DriftEvent, WorldConfig
from dualrerank.sim.real_lists import RealListConfig, real_list_state
from dualrerank.sim.state import Feedback, WorldState
from dualrerank.sim.world import Reference, World

__all__ = ["World", "WorldConfig", "WorldState", "Feedback", "Reference", "DriftEvent", "RealListConfig", "real_list_state"]
