"""Changing a graph: plans as data (`plan`), channel maps applied to every layer of a group
(`channels`), applying plans (`surgery`, `compose`), the embedding operators that grow a
network without changing what it computes (`operators`), and the monitor's symmetry
breaking (`escape`)."""
