"""List the recipes, or show one (its stages, settings and profiles).

    edgeus recipes                 # name and description of every recipe
    edgeus recipes rsmas_int8      # the whole recipe file and where it lives
"""
from edgeus import resources

USAGE = "[name]"


def run(cfg, args):
    from omegaconf import OmegaConf

    if args:
        try:
            path = resources.find("recipes", args[0])
        except KeyError as e:
            from edgeus.errors import EdgeusError

            raise EdgeusError(e.args[0]) from None
        print(f"# {path}\n{path.read_text()}")
        return 0
    names = resources.list_options("recipes")
    w = max(map(len, names), default=4)
    for n in names:
        r = OmegaConf.load(resources.find("recipes", n)).get("recipe", {})
        stages = " -> ".join(r.get("stages", []))
        print(f"{n.ljust(w)}  {r.get('description', '')}\n{' ' * w}  stages: {stages}")
    return 0
