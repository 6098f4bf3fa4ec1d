# Circus's built-in jobset walker: what nix-eval-jobs does, in plain Nix, for
# machines without nix-eval-jobs (Debian ships none).
#
# It walks `root` depth-first in attribute order and reports through
# `builtins.trace` lines that start with `marker`, so the Python side reads
# them as they come (stderr) and knows, when Nix dies on an error `tryEval`
# cannot catch, which attribute it was evaluating:
#
#   <marker>B<path>           about to force the value at <path> (structure)
#   <marker>S<path>           about to evaluate the job at <path>
#   <marker>J<path> <record>  the job's record (JSON)
#   <marker>F<path>           the job or attribute threw a catchable error
#   <marker>T<n>              the structure walk is done: n items follow
#
# <path> is the JSON list of attribute names. With `markers = false` (the fast
# first run) only J, F and T lines are printed. The value printed on stdout is a
# store file referencing every job's .drv (one GC root keeps them all), or null.
{ root
, marker
  # JSON-path -> drv path (or null) of attributes already handled by an earlier run
, skip ? { }
  # when set: evaluate exactly these attribute paths (no walk), e.g. to get error messages
, only ? null
  # false: let errors abort the process so their message reaches stderr
, catch ? true
  # roots file name; null disables it
, rootsName ? null
  # how error messages name the root attribute
, rootName ? "the jobset's attribute"
  # B and S markers (to locate an error that kills Nix); off on the fast first run
, markers ? true
}:
let
  inherit (builtins) attrNames concatMap filter isAttrs isFunction isList isString
    listToAttrs map toJSON trace tryEval;

  # `skip ? <key>` makes the key a symbol, which Nix never frees: not on a first run
  skipping = skip != { };

  emit = kind: text: value: trace "${marker}${kind}${text}" value;
  mark = kind: text: value: if markers then emit kind text value else value;

  isDerivation = v: isAttrs v && (v.type or null) == "derivation";

  # meta may hold functions (not JSON) and derivations (coerced to their path)
  clean = depth: v:
    if isFunction v || depth > 4 then null
    else if isList v then map (clean (depth + 1)) v
    else if isAttrs v && !(v ? outPath) then
      builtins.mapAttrs (_: clean (depth + 1)) v
    else v;
  metaFields = [ "description" "license" "homepage" "maintainers" "timeout" "maxSilent"
                 "schedulingPriority" "hydra" "outputsToInstall" ];
  metaOf = v:
    let meta = v.meta or { }; in
    if !(isAttrs meta) || meta == { } then { }
    else listToAttrs (concatMap
      (n: if meta ? ${n} then [{ name = n; value = clean 0 meta.${n}; }] else [ ])
      metaFields);

  outputsOf = v:
    let outputs = v.outputs or [ "out" ]; in
    if outputs == [ "out" ] then { out = v.outPath; }
    else listToAttrs (map (o: { name = o; value = v.${o}.outPath; }) outputs);

  aggregateOf = v:
    if (v._hydraAggregate or false) == true then
      let cs = v.constituents or [ ]; in {
        constituents = map (c: c.drvPath) (filter (c: !(isString c)) cs);
        namedConstituents = filter isString cs;
      } // (if (v._hydraGlobConstituents or false) == true
            then { globConstituents = true; } else { })
    else { };

  # the JSON record of a job; no key may be called outPath (toJSON would coerce it)
  recordOf = v: {
    name = v.name;
    system = v.system;
    drvPath = v.drvPath;
    outputs = outputsOf v;
    meta = metaOf v;
  } // aggregateOf v;

  guard = x: if catch then tryEval x else { success = true; value = x; };

  # job item: forced by the fold below, after its S marker; toJSON forces the
  # whole record, so tryEval sees every catchable error in it
  job = key: v:
    let r = guard (toJSON (recordOf v)); in
    {
      inherit key;
      ok = r.success;
      json = r.value;
      drv = if r.success then builtins.unsafeDiscardOutputDependency v.drvPath else null;
    };

  classify = v:
    if isDerivation v then "job" else if isAttrs v then "attrs" else "other";

  # The walk: a flat list of items; forcing its spine walks the structure
  # (B markers), forcing an item evaluates one job (S markers).
  walk = path: v:
    let
      key = toJSON path;
      kind = guard (classify v);
    in
    if skipping && skip ? ${key} then [ ]
    else mark "B" key (
      if !kind.success then [{ inherit key; failed = true; }]
      else if kind.value == "job" then [{ inherit key; thunk = job key v; }]
      else if kind.value == "attrs" then
        concatMap (n: walk (path ++ [ n ]) v.${n})
          (filter (n: n != "recurseForDerivations") (attrNames v))
      else [ ]);

  # `only` mode: each listed path is one item; the lookup itself is part of it
  direct = path:
    let
      key = toJSON path;
      value = builtins.foldl' (acc: n: acc.${n}) root path;
      kind = guard (classify value);
    in
    if skipping && skip ? ${key} then [ ]
    else [{
      inherit key;
      thunk =
        if !kind.success then { inherit key; ok = false; drv = null; }
        else if kind.value == "job" then job key value
        else { inherit key; ok = true; drv = null; json = null; };
    }];

  # a function, so that the list is bound nowhere (see drvs)
  walkAll = _:
    if only != null then concatMap direct only
    else if !(isAttrs root) then
      throw "${rootName} is a ${builtins.typeOf root}, not an attribute set of jobs"
    else if isDerivation root then
      throw "${rootName} is a single derivation, not an attribute set of jobs"
    else walk [ ] root;

  # force one item: markers first, then the work; the value is the job's .drv path
  # (null for anything else), all that is kept of the item once it is forced
  force = item:
    if item ? failed then emit "F" item.key null
    else
      mark "S" item.key (
        let j = item.thunk; in
        if j.ok && j.drv != null then emit "J" "${item.key} ${j.json}" j.drv
        else if j.ok then null
        else emit "F" item.key null);

  # the items themselves are bound nowhere: each is garbage once forced (Nix keeps a
  # let's bindings alive with the let, and the items' records add up at 50,000 jobs)
  drvs = map force (walkAll null);
  done = builtins.foldl' (n: drv: builtins.seq drv (n + 1)) 0 drvs;
  # T<n>: the walk is complete, n items follow
  counted = emit "T" (toString (builtins.length drvs)) null;
in
builtins.seq counted (builtins.seq done (
  if rootsName == null then null
  else builtins.toFile rootsName (builtins.concatStringsSep "\n" (filter (d: d != null) drvs))))
