# STAND-IN for the parts of nixpkgs' `lib` that deploy/nixos/*.nix and flake.nix use,
# plus a miniature of the NixOS module system (evalModules). Written for the tests in
# tests/deploy/ because there is no nixpkgs on the test machines. It is NOT nixpkgs:
#   - mkIf / mkMerge / mkOverride (mkDefault, mkForce) are pushed into attribute sets the
#     way the real module system does (conditions are not evaluated to learn attribute
#     names, so `mkIf cfg.enable { ... }` does not recurse forever);
#   - declared options merge by priority and their type (a few types, checked), undeclared
#     paths (systemd.services, users.users, services.postgresql, ...) are merged freely:
#     attribute sets recursively, lists concatenated, scalars must agree. The real NixOS
#     declares and type-checks those options; this stand-in does not.
# Anything the modules need beyond this file fails the tests loudly (missing attribute).
let
  b = builtins;

  isWrapper = v: b.isAttrs v && v ? _type && b.elem v._type [ "if" "merge" "override" ];
  isLeafAttrs = v: v ? outPath || v ? _type;
  unionNames = sets: b.attrNames (b.foldl' (acc: s: acc // s) { } sets);

  # pushDownProperties: a definition -> attribute sets whose values carry the wrappers
  pushDown = v:
    if v._type or null == "merge" then b.concatMap pushDown v.contents
    else if v._type or null == "if" then
      map (b.mapAttrs (_: lib.mkIf v.condition)) (pushDown v.content)
    else if v._type or null == "override" then
      map (b.mapAttrs (_: lib.mkOverride v.priority)) (pushDown v.content)
    else if b.isAttrs v then [ v ]
    else throw "stand-in lib: expected an attribute set of definitions, got ${b.typeOf v}";

  # strip wrappers of one definition, evaluating its conditions
  flatten = prio: v:
    if v._type or null == "merge" then b.concatMap (flatten prio) v.contents
    else if v._type or null == "if" then (if v.condition then flatten prio v.content else [ ])
    else if v._type or null == "override" then flatten v.priority v.content
    else [ { inherit prio; value = v; } ];

  best = defs:
    let top = b.foldl' (m: d: if d.prio < m then d.prio else m) 100000 defs;
    in b.filter (d: d.prio == top) defs;

  showLoc = loc: b.concatStringsSep "." loc;

  unique = loc: defs:
    let first = (b.head defs).value;
    in if b.all (d: d.value == first) defs then first
       else throw "stand-in lib: conflicting definitions for ${showLoc loc}";

  # merge of an undeclared (free-form) path: per-leaf priorities, like attrsOf
  mergeFree = loc: rawDefs:
    let
      flat = b.concatMap (flatten 100) rawDefs;
      top = best flat;
      values = map (d: d.value) top;
    in
    if flat == [ ] then { }   # every definition switched off by mkIf
    else if b.all (v: b.isAttrs v && !isLeafAttrs v) values then
      let
        children = n: b.concatMap (d: if d.value ? ${n} then [ (lib.mkOverride d.prio d.value.${n}) ] else [ ])
          (b.filter (d: b.isAttrs d.value && !isLeafAttrs d.value) flat);
        names = unionNames (map (d: d.value) (b.filter (d: b.isAttrs d.value && !isLeafAttrs d.value) flat));
        merged = map (n: { name = n; value = mergeFree (loc ++ [ n ]) (children n); })
          (b.filter (n: b.concatMap (flatten 100) (children n) != [ ]) names);
      in b.listToAttrs merged
    else if b.all b.isList values then b.concatLists values
    else unique loc top;

  mergeOption = loc: opt: rawDefs:
    let
      flat = b.concatMap (flatten 100) rawDefs
        ++ (if opt ? default then [ { prio = 1500; value = opt.default; } ] else [ ]);
      top = best flat;
      value = if flat == [ ] then throw "stand-in lib: option ${showLoc loc} is used but not defined"
              else opt.type.merge loc top;
    in
    if opt.type.check value then value
    else throw "stand-in lib: option ${showLoc loc} is not of type ${opt.type.name}";

  # declared tree: names come from declarations and pushed-down definitions
  mergeAt = loc: decl: rawDefs:
    if decl == null then mergeFree loc rawDefs
    else if decl._type or null == "option" then mergeOption loc decl rawDefs
    else
      let
        sets = b.concatMap pushDown rawDefs;
        children = n: b.concatMap (s: if s ? ${n} then [ s.${n} ] else [ ]) sets;
        names = unionNames ([ decl ] ++ sets);
      in
      # no filtering here: that would evaluate mkIf conditions to learn names
      b.listToAttrs (map (n: { name = n; value = mergeAt (loc ++ [ n ]) (decl.${n} or null) (children n); })
        names);

  mkType = name: check: merge: { inherit name check merge; };
  uniqueType = name: check: mkType name check unique;

  lib = {
    inherit (b) attrNames attrValues concatStringsSep concatLists concatMap elem filter
      any all isAttrs isList isString isInt isBool length head listToAttrs mapAttrs
      hasAttr toJSON match replaceStrings;

    mkOverride = priority: content: { _type = "override"; inherit priority content; };
    mkDefault = lib.mkOverride 1000;
    mkForce = lib.mkOverride 50;
    mkIf = condition: content: { _type = "if"; inherit condition content; };
    mkMerge = contents: { _type = "merge"; inherit contents; };
    mkOption = attrs: attrs // { _type = "option"; };
    mkEnableOption = name: lib.mkOption {
      type = lib.types.bool; default = false; description = "Whether to enable ${name}.";
    };
    literalExpression = text: { _type = "literalExpression"; inherit text; };
    mdDoc = s: s;
    cleanSource = src: src;
    makeBinPath = pkgs: b.concatStringsSep ":" (map (p: "${p}/bin") pkgs);
    licenses.mit = { spdxId = "MIT"; };

    optional = c: x: if c then [ x ] else [ ];
    optionals = c: xs: if c then xs else [ ];
    optionalString = c: s: if c then s else "";
    optionalAttrs = c: a: if c then a else { };
    hasPrefix = p: s: b.substring 0 (b.stringLength p) s == p;
    genAttrs = names: f: b.listToAttrs (map (n: { name = n; value = f n; }) names);
    filterAttrs = pred: set: b.listToAttrs (b.concatMap
      (n: if pred n set.${n} then [ { name = n; value = set.${n}; } ] else [ ]) (b.attrNames set));
    attrByPath = path: default: set:
      if path == [ ] then set
      else if b.isAttrs set && set ? ${b.head path}
      then lib.attrByPath (b.tail path) default set.${b.head path}
      else default;
    collect = pred: v:
      if pred v then [ v ]
      else if b.isAttrs v then b.concatMap (lib.collect pred) (b.attrValues v)
      else [ ];

    types = rec {
      bool = uniqueType "bool" b.isBool;
      str = uniqueType "str" b.isString;
      int = uniqueType "int" b.isInt;
      port = uniqueType "port" (v: b.isInt v && v >= 0 && v <= 65535);
      positiveInt = uniqueType "positiveInt" (v: b.isInt v && v > 0);
      path = uniqueType "path" (v: b.isPath v || (b.isString v && b.substring 0 1 v == "/"));
      package = uniqueType "package" (v: b.isAttrs v && v ? outPath);
      enum = values: uniqueType "one of ${b.toJSON values}" (v: b.elem v values);
      nullOr = t: mkType "null or ${t.name}" (v: v == null || t.check v)
        (loc: defs: if b.all (d: d.value == null) defs then null else t.merge loc defs);
      listOf = t: mkType "list of ${t.name}" (v: b.isList v && b.all t.check v)
        (loc: defs: b.concatLists (map (d: d.value) defs));
      attrsOf = t: mkType "attribute set of ${t.name}" (v: b.isAttrs v && b.all t.check (b.attrValues v))
        (loc: defs: mergeFree loc (map (d: lib.mkOverride d.prio d.value) defs));
      # pkgs.formats.*.type: nested attribute sets of JSON-like values
      freeform = mkType "free-form settings" b.isAttrs
        (loc: defs: mergeFree loc (map (d: lib.mkOverride d.prio d.value) defs));
    };

    # evalModules { modules; specialArgs } -> { config; options }
    evalModules = { modules, specialArgs ? { } }:
      let
        args = { inherit lib config options; } // specialArgs;
        load = m: if b.isPath m || b.isString m then load (import m)
          else if b.isFunction m then m args
          else m;
        collectAll = m: let loaded = load m; in
          [ loaded ] ++ b.concatMap collectAll (loaded.imports or [ ]);
        all = b.concatMap collectAll modules;
        # a module with neither `options` nor `config` is all config (but its imports)
        structured = m: m ? options || m ? config;
        declOf = m: if structured m then m.options or { } else { };
        defOf = m: if structured m then m.config or { }
          else removeAttrs m [ "_file" "key" "meta" "imports" "disabledModules" ];
        mergeDecls = a: c: a // b.mapAttrs (n: v:
          if a ? ${n} && !(v._type or null == "option") && !(a.${n}._type or null == "option")
          then mergeDecls a.${n} v
          else if a ? ${n} then throw "stand-in lib: option ${n} declared twice"
          else v) c;
        options = b.foldl' mergeDecls { } (map declOf all);
        config = mergeAt [ ] options (map defOf all);
      in { inherit config options; };
  };
in
lib
