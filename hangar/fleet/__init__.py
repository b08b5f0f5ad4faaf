"""A fleet of hosts on etcd: stateless API replicas (``hangar api --etcd``) and one agent per
host (``hangar agent --etcd``), sharing machines, tenancy, volumes and claims in etcd.

- ``stores``: ``FleetStores``, the shared stores of one fleet opened from the settings;
- ``work``: runs addressed to a host (``WorkQueue``) and the agent's intake (``WorkIntake``);
- ``board``: what each agent publishes about its machines' runs (``RunBoard``);
- ``placer``: ``FleetPlacer``, the scheduler over every reachable, uncordoned host's claims;
- ``replica``: ``build_replica``, the API process; ``host_agent``: the agent process.
"""
